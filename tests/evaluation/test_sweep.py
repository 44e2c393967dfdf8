"""evaluation/sweep.py: a sweep over schedulers and steps, its files and plot, and its spec.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from difftool.errors import UserError
from difftool.evaluation.evaluate import (
    MetricOptions,
)
from difftool.evaluation.sweep import (
    PLOT_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    Setting,
    parse_sweep,
    plot_fd_vs_nfe,
    sweep,
)
from difftool.sampling.job import SampleRequest
from tests.conftest import assert_user_error, invoke

runner = CliRunner()


def test_sweep_writes_table_csv_json_and_plot(tiny_run, tmp_path, extractor_file):
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    rows = sweep(str(tiny_run), "ddim:2,4;dpm-solver:3;heun:2", reference="shapes", options=options,
                 request=SampleRequest(num_images=10, batch_size=10), output=tmp_path / "sw")
    # the tiny run samples with its recipe's guidance: a guided step is two network evaluations
    assert [(r["scheduler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 4), ("ddim", 4, 8), ("dpm-solver", 3, 6), ("heun", 2, 6)]
    with (tmp_path / "sw" / RESULTS_CSV).open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["fd"]) for r in table] == pytest.approx([r["fd"] for r in rows])
    assert all(float(r["img_per_s"]) > 0 and int(r["num_images"]) == 10 for r in table)
    saved = json.loads((tmp_path / "sw" / RESULTS_JSON).read_text())
    assert saved["distance"] == "FD" and len(saved["rows"]) == 4
    with Image.open(tmp_path / "sw" / PLOT_FILE) as plot:
        assert plot.format == "PNG" and plot.width > 300
    # each setting saw the same seeds: image 0 of ddim-2 and ddim-4 start from the same noise
    for name in ("ddim-2", "ddim-4", "dpm-solver-3", "heun-2"):
        assert (tmp_path / "sw" / "samples" / name / "samples.npz").is_file()


def test_plot_has_one_line_per_scheduler(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: lines.append((a, k["label"])) or original(self, *a, **k))
    rows = [{"scheduler": s, "steps": n, "nfe": n, "fd": f} for s, n, f in
            [("ddim", 10, 30.0), ("ddim", 20, 20.0), ("unipc", 10, 25.0)]]
    plot_fd_vs_nfe(rows, tmp_path / "p.png")
    assert [label for _, label in lines] == ["ddim", "unipc"]
    assert lines[0][0] == ((10, 20), (30.0, 20.0))


@pytest.mark.parametrize("spec, message", [
    ("ddim", "needs the form SCHEDULER:STEPS"),
    ("ddim:10,x", "'x' for ddim is not a positive whole number"),
    ("ddmi:10", "unknown scheduler 'ddmi'; did you mean 'ddim'"),
    (" ; ", "--sweep has no scheduler"),
    ("guidance:2,3", "--sweep has no scheduler"),
    ("ddim:4;guidance:", "needs the form"),
    ("ddim:4;guidance:2,x", "guidance scale 'x' is not a number of at least 0"),
    ("ddim:4;guidance:nan", "guidance scale 'nan' is not a number"),
    ("ddim:4;guidance:inf", "guidance scale 'inf' is not a number"),
    ("ddim:4;guidance:-1", "guidance scale '-1' is not a number of at least 0"),
    ("ddim:4;guidance:٣", "guidance scale '٣' is not a number"),
])
def test_bad_sweep_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_sweep(spec)


def test_sweep_spec_parses_aliases_and_drops_repeats():
    assert parse_sweep("dpmpp-2m:10,20; ddim:5 ;dpm-solver:10") == [
        Setting("dpm-solver", 10), Setting("dpm-solver", 20), Setting("ddim", 5)]


def test_a_guidance_part_crosses_every_setting_with_its_scales():
    assert parse_sweep("guidance:1.5, 3;ddim:4,8;guidance:3,2") == [
        Setting("ddim", 4, 1.5), Setting("ddim", 4, 3.0), Setting("ddim", 4, 2.0),
        Setting("ddim", 8, 1.5), Setting("ddim", 8, 3.0), Setting("ddim", 8, 2.0)]


def test_a_guidance_sweep_samples_each_scale_and_labels_it(tiny_run, tmp_path, extractor_file, monkeypatch):
    """The same seeds at every scale: guidance 1 takes one call a step, guidance above 1 two, and the images
    differ; each scale has its folder, column, table line and plot line."""
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: lines.append(k["label"]) or original(self, *a, **k))
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    rows = sweep(str(tiny_run), "ddim:2;guidance:1,4", reference="shapes", options=options,
                 request=SampleRequest(num_images=10, batch_size=10), output=tmp_path / "sw")
    assert [(r["scheduler"], r["steps"], r["guidance"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 1.0, 2), ("ddim", 2, 4.0, 4)]
    assert rows[0]["fd"] != rows[1]["fd"]
    samples = [tmp_path / "sw" / "samples" / name / "samples.npz" for name in ("ddim-2-g1", "ddim-2-g4")]
    first, second = (np.load(path)["arr_0"] for path in samples)
    assert first.shape == second.shape and not np.array_equal(first, second)
    with (tmp_path / "sw" / RESULTS_CSV).open() as f:
        assert [row["guidance"] for row in csv.DictReader(f)] == ["1.0", "4.0"]
    assert lines == ["ddim, guidance 1", "ddim, guidance 4"]


def test_a_sweep_without_guidance_keeps_its_folders_and_an_empty_column(tiny_run, tmp_path, extractor_file):
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    rows = sweep(str(tiny_run), "ddim:2", reference="shapes", options=options,
                 request=SampleRequest(num_images=4, batch_size=4, guidance_scale=2.0), output=tmp_path / "sw")
    assert rows[0]["guidance"] is None and rows[0]["nfe"] == 4  # guided at --guidance-scale 2: two calls a step
    assert (tmp_path / "sw" / "samples" / "ddim-2" / "samples.npz").is_file()
    with (tmp_path / "sw" / RESULTS_CSV).open() as f:
        assert next(csv.DictReader(f))["guidance"] == ""


def test_guidance_in_the_sweep_and_the_flag_is_refused(tiny_run, tmp_path):
    with pytest.raises(UserError, match="either in --sweep's guidance: part or with --guidance-scale"):
        sweep(str(tiny_run), "ddim:2;guidance:2", reference="shapes", options=MetricOptions(),
              request=SampleRequest(num_images=4, guidance_scale=3.0), output=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_a_guidance_sweep_of_an_unconditional_model_is_refused(tmp_path, scratch_cwd, extractor_file):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40)).save_pretrained(tmp_path / "pipe")
    result = invoke("evaluate", tmp_path / "pipe", "--reference", "shapes", "--features", extractor_file, "-n", "4",
                    "--sweep", "ddim:2;guidance:1,2", "--output", tmp_path / "sw")
    assert_user_error(result, "--guidance-scale needs a class-conditional model")


def test_the_sweep_table_has_a_guidance_column_when_swept(tiny_run, tmp_path, extractor_file):
    result = invoke("evaluate", tiny_run, "--reference", "shapes", "--features", extractor_file, "-n", "4",
                    "--sweep", "ddim:2;guidance:1,3", "--output", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "ddim" in line]
    header = next(line for line in result.output.splitlines() if "NFE" in line)
    assert "guidance" in header and header.index("guidance") < header.index("NFE")
    cells = [[c.strip() for c in line.split("│")[1:5]] for line in lines]
    assert cells == [["ddim", "2", "1", "2"], ["ddim", "2", "3", "4"]]  # scheduler, steps, guidance, NFE
