"""evaluation/sweep.py: a sweep over schedulers and steps, its files and plot, and its spec.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import csv
import json

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
    parse_sweep,
    plot_fd_vs_nfe,
    sweep,
)
from difftool.sampling.job import SampleRequest

runner = CliRunner()


def test_sweep_writes_table_csv_json_and_plot(tiny_run, tmp_path, extractor_file):
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    rows = sweep(str(tiny_run), "ddim:2,4;dpm-solver:3;heun:2", reference="shapes", options=options,
                 request=SampleRequest(num_images=10, batch_size=10), output=tmp_path / "sw")
    assert [(r["scheduler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2), ("ddim", 4, 4), ("dpm-solver", 3, 3), ("heun", 2, 3)]
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
    (" ; ", "--sweep is empty"),
])
def test_bad_sweep_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_sweep(spec)


def test_sweep_spec_parses_aliases_and_drops_repeats():
    assert parse_sweep("dpmpp-2m:10,20; ddim:5 ;dpm-solver:10") == [("dpm-solver", 10), ("dpm-solver", 20),
                                                                      ("ddim", 5)]
