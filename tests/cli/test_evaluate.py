"""`difftool evaluate` and `difftool stats` from the command line: tables, files, refusals, two processes.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from difftool.cli.app import app
from difftool.evaluation.evaluate import (
    MetricOptions,
    build_stats,
    evaluate,
)
from difftool.sampling.job import SampleRequest
from tests.conftest import assert_user_error
from tests.evaluation.conftest import shapes, write_images

runner = CliRunner()


# ---------------------------------------------------------------- the CLI


def test_cli_evaluate_folder_against_itself(tmp_path, extractor_file):
    folder = write_images(tmp_path / "imgs", shapes(20))
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", str(folder), "--reference", str(folder), "--features", str(extractor_file),
                                 "--kid-subset-size", "10", "--output", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert abs(record["fd"]) < 1e-3 and record["precision"] == 1.0 and record["num_images"] == 20
    assert "N = 20 images" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["fd"] == record["fd"]


def test_cli_stats_then_evaluate_with_the_file(tmp_path, extractor_file):
    stats = tmp_path / "real.npz"
    result = runner.invoke(app, ["stats", "shapes", "--output", str(stats), "--resolution", "8",
                                 "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "statistics of 10000 images" in result.stderr
    folder = write_images(tmp_path / "imgs", shapes(10))
    result = runner.invoke(app, ["evaluate", str(folder), "-r", str(stats), "--features", str(extractor_file),
                                 "-o", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    assert "FD" in result.stdout and "precision / recall" in result.stdout


def test_the_0_1_0_spelling_evaluate_stats_still_works_and_a_folder_called_stats_is_evaluated(
        tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "stats", "shapes", "--output", "real.npz", "--resolution", "8",
                                 "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "`difftool stats` now" in result.stderr and Path("real.npz").is_file()
    write_images(tmp_path / "stats", shapes(10))  # no ./ needed any more
    result = runner.invoke(app, ["evaluate", "stats", "-r", "real.npz", "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("evaluations/stats/metrics.json").read_text())["num_images"] == 10


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "{one}", "--features", "{ext}"], ["holds 1 image"]),
    (["evaluate", "{imgs}", "--features", "bogus"], ["unknown --features 'bogus'"]),
    (["evaluate", "{imgs}", "-r", "{stats16}", "--features", "{ext}"], ["made from 16-px images, these are 8 px"]),
    (["evaluate", "{imgs}", "-r", "{stats16}", "--features", "inception", "--inception-weights", "{incep}"],
     ["made with the feature extractor torchscript"]),
    (["evaluate", "{imgs}", "--scheduler", "ddim", "--features", "{ext}"], ["holds images, not a model"]),
    (["evaluate", "{imgs}", "--eta", "1", "--features", "{ext}"], ["holds images, not a model", "--eta do not"]),
    (["stats", "shapes"], ["Missing option '--output'"]),
    (["stats", "--output", "x.npz"], ["Missing argument 'DATA'"]),
    (["evaluate", "{imgs}", "extra"], ["unexpected extra argument (extra)"]),
    (["evaluate", "{imgs}", "--sweep", "ddim:2", "--features", "{ext}"], ["--sweep samples a model"]),
    (["evaluate", "{imgs}", "--features", "{ext}", "--inception-weights", "{incep}"], ["--inception-weights applies"]),
    (["evaluate", "{imgs}", "--num-samples", "0"], ["'--num-samples'", "1<=x"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, extractor_file, fake_inception, args, fragments):
    paths = {"one": write_images(tmp_path / "one", shapes(1)), "imgs": write_images(tmp_path / "imgs", shapes(6)),
             "ext": extractor_file, "incep": fake_inception, "stats16": tmp_path / "s16.npz"}
    build_stats("shapes", paths["stats16"], resolution=16, options=MetricOptions(features=str(extractor_file)))
    argv = [a.format(**paths) for a in args] + ([] if "stats" in args else ["-o", str(tmp_path / "out")])
    assert_user_error(runner.invoke(app, argv), *fragments)


def test_eta_samples_what_sample_eta_samples(tiny_run, tmp_path, extractor_file):
    """The student's noise knob: evaluate --eta scores the very images sample --eta makes, and records it."""
    common = ["--scheduler", "ddim", "--steps", "3", "--eta", "1", "--seed", "4"]
    made = runner.invoke(app, ["sample", str(tiny_run), "-n", "6", *common, "--format", "npz", "-o",
                               str(tmp_path / "s"), "-q"])
    assert made.exit_code == 0, made.output
    scored = runner.invoke(app, ["evaluate", str(tiny_run), "-r", "shapes", "-n", "6", *common, "--features",
                                 str(extractor_file), "--kid-subset-size", "4", "-o", str(tmp_path / "e"), "-q"])
    assert scored.exit_code == 0, scored.output
    with np.load(tmp_path / "s" / "samples.npz") as a, np.load(tmp_path / "e" / "samples" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["sampling"]["eta"] == 1.0
    deterministic = runner.invoke(app, ["evaluate", str(tiny_run), "-r", "shapes", "-n", "6", *common[:-4],
                                        "--seed", "4", "--features", str(extractor_file), "--kid-subset-size", "4",
                                        "-o", str(tmp_path / "d"), "-q"])
    assert deterministic.exit_code == 0, deterministic.output
    with np.load(tmp_path / "d" / "samples" / "samples.npz") as c, np.load(tmp_path / "e" / "samples" / "samples.npz") as b:
        assert not np.array_equal(c["arr_0"], b["arr_0"])
    refused = runner.invoke(app, ["evaluate", str(tiny_run), "-r", "shapes", "-n", "6", "--scheduler", "euler",
                                  "--eta", "1", "--features", str(extractor_file), "-o", str(tmp_path / "x")])
    assert_user_error(refused, "--eta applies to")


def test_cli_sweep_table(tiny_run, tmp_path, extractor_file):
    result = runner.invoke(app, ["evaluate", str(tiny_run), "-r", "shapes", "--sweep", "ddim:2;euler:2", "-n", "6",
                                 "--features", str(extractor_file), "--kid-subset-size", "4", "-o",
                                 str(tmp_path / "sw"), "-q"])
    assert result.exit_code == 0, result.output
    for word in ("scheduler", "NFE", "FD", "img/s", "ddim", "euler", "N = 6 samples per setting"):
        assert word in result.stdout
    assert "N = 6 samples per setting: FID is biased" in result.stderr.replace("\n", " ")


@pytest.mark.slow
def test_evaluate_under_two_processes_scores_once(tiny_run, tmp_path, extractor_file):
    import subprocess

    from tests.conftest import difftool_cmd, free_port

    out = tmp_path / "ev"
    cmd = difftool_cmd() + ["evaluate", str(tiny_run), "-r", "shapes", "-n", "10", "--steps", "2", "--batch-size", "3",
                            "--features", str(extractor_file), "--kid-subset-size", "5", "-o", str(out),
                            "--num-processes", "2", "--main-process-port", str(free_port()), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("precision / recall") == 1  # rank 0 alone reports
    single = evaluate(str(tiny_run), reference="shapes", output=tmp_path / "one",
                      options=MetricOptions(features=str(extractor_file), kid_subset_size=5),
                      request=SampleRequest(num_images=10, steps=2, batch_size=3))
    with np.load(out / "samples" / "samples.npz") as a, np.load(tmp_path / "one" / "samples" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    # the same images; features may differ in the last float32 bits with another thread count
    assert json.loads((out / "metrics.json").read_text())["fd"] == pytest.approx(single.record["fd"], rel=1e-6)


def test_cli_evaluate_compile_samples_as_eager_does(tiny_run, tmp_path, extractor_file):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = ["evaluate", str(tiny_run), "-r", "shapes", "-n", "4", "--batch-size", "2", "--steps", "2",
            "--features", str(extractor_file), "--kid-subset-size", "2", "-q"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = runner.invoke(app, [*base, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert counters["stats"]["unique_graphs"] == 1, "the UNet was compiled once"
    eager, compiled = (np.load(tmp_path / name / "samples" / "samples.npz")["arr_0"].astype(int)
                       for name in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1
