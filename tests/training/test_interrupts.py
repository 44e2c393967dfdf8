"""Ctrl-C at every moment: during evaluation while training, a second Ctrl-C, a run read while it rotates
its checkpoints, and a Ctrl-C during the interpreter's shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftool import config as config_mod
from difftool.errors import UserError
from difftool.evaluation.evaluate import Scorer
from difftool.models import checkpoints as checkpoints_mod
from difftool.models.load import load_model
from difftool.reporting.facts import read_facts
from difftool.rundir import PROGRESS_FILE, RunDir
from difftool.training.loop import train
from difftool.training.outputs import RunWriter
from difftool.training.step import Stepper
from tests.conftest import difftool_cmd, invoke, tiny_config


def eval_overrides(features: Path, every: int, samples: int = 6, steps: int = 2) -> list[str]:
    """Evaluation during training with a stand-in feature network and the run's data as the reference."""
    return [f"eval.every={every}", f"eval.num_samples={samples}", f"eval.features={features}", "eval.reference=data",
            "eval.reference_images=null", "eval.scheduler=ddim", f"eval.steps={steps}", "eval.guidance_scale=1"]


def session_end(run: Path) -> dict:
    lines = [json.loads(line) for line in RunDir(run).sessions.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["start", "end"], lines
    return lines[-1]


def eval_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    return [line for line in lines if "eval/num_samples" in line]


def leftovers(run: Path) -> list[Path]:
    """Temporary files and folders, and locks, that an interrupted write or a live command leaves."""
    return [p for p in run.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".lock")]


# ---------------------------------------------------------------- Ctrl-C during evaluation while training


@pytest.mark.slow
def test_ctrl_c_while_an_evaluation_samples_stops_within_seconds_as_stopped(tmp_path, extractor_file):
    """Sampling 100,000 images would take an hour: the first Ctrl-C abandons it, saves the step's checkpoint."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(config_mod.dump_yaml(tiny_config(*eval_overrides(extractor_file, every=2, samples=100_000,
                                                                         steps=20), "checkpoint.every=100")))
    run = tmp_path / "run"
    cmd = difftool_cmd() + ["train", "--recipe", str(recipe), "--output", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (run / "eval" / "samples" / "sample.json").is_file():  # written as the sampling starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(0.5)  # well into the sampling loop
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=30)
        waited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert waited < 10, f"the evaluation ran on for {waited:.0f} s after Ctrl-C"
    assert "Traceback" not in err and "evaluation at step 2 abandoned" in err
    assert session_end(run)["outcome"] == "stopped" and session_end(run)["step"] == 2
    assert [c.name for c in RunDir(run).checkpoints()] == ["step-000002"], "the stopped step gets its checkpoint"
    assert eval_records(run) == [] and not leftovers(run)


@pytest.mark.parametrize("phase", ["scoring", "saving the best"])
def test_ctrl_c_while_an_evaluation_scores_or_saves_abandons_it_and_keeps_the_training_weights(
        tmp_path, extractor_file, tiny_run, monkeypatch, phase):
    """The signal arrives inside the phase; the checkpoint then saved holds the trained weights, not the EMA
    weights the evaluation swapped in: those of an uninterrupted run at that step."""
    owner, name = (Scorer, "score") if phase == "scoring" else (RunWriter, "save_best")
    real = getattr(owner, name)

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    cfg = tiny_config(*eval_overrides(extractor_file, every=3), "checkpoint.every=100")
    result = train(cfg, tmp_path / "run")
    run = RunDir(result.run)
    assert (result.finished, result.step) == (False, 3)
    assert session_end(run.root) == {**session_end(run.root), "outcome": "stopped", "step": 3}
    assert eval_records(run.root) == [] and not (run.best_checkpoint / PROGRESS_FILE).exists()
    assert [c.name for c in run.checkpoints()] == ["step-000003"] and not leftovers(run.root)
    saved = load_file(run.checkpoints()[0] / "model.safetensors")
    uninterrupted = load_file(tiny_run / "checkpoints" / "step-000003" / "model.safetensors")
    assert saved.keys() == uninterrupted.keys()
    assert all(torch.equal(saved[key], uninterrupted[key]) for key in saved)


def test_a_second_ctrl_c_exits_130_and_the_session_is_recorded_as_stopped(tmp_path, tiny_recipe, monkeypatch):
    """Stop now: no checkpoint is waited for, and `report` says stopped (Ctrl-C), not stopped by an error."""
    real = Stepper.step

    def step(self, index, *args, **kwargs):
        if index == 4:  # Ctrl-C twice during the fifth step
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", step)
    run = tmp_path / "run"
    result = invoke("train", "--recipe", tiny_recipe, "--output", run, "-q")
    assert result.exit_code == 130, result.output
    assert session_end(run)["outcome"] == "stopped" and session_end(run)["step"] == 4
    assert [c.name for c in RunDir(run).checkpoints()] == ["step-000003"]
    state = read_facts(RunDir(run), 4).state
    assert state.startswith("stopped (Ctrl-C or a signal) at step 4"), state


# ---------------------------------------------------------------- reading a run while it rotates checkpoints


def training_run(tiny_run: Path, tmp_path: Path) -> RunDir:
    """tiny_run as it is while training: checkpoints 3 and 6, no model/ yet."""
    run = RunDir(shutil.copytree(tiny_run, tmp_path / "run"))
    shutil.rmtree(run.model_dir)
    return run


def train_one_more_step(run: RunDir) -> None:
    """What training with checkpoint.total_limit=1 does: step-000007 saved, then the older ones rotated away."""
    newest = run.latest_checkpoint()
    saved = shutil.copytree(newest, run.checkpoints_dir / ".tmp-step-000007")
    progress = json.loads((saved / PROGRESS_FILE).read_text())
    (saved / PROGRESS_FILE).write_text(json.dumps({**progress, "step": 7}))
    saved.rename(run.checkpoint(7))
    run.rotate(1)


@pytest.mark.parametrize("read", ["_read_tensors", "read_progress"])
def test_a_checkpoint_rotated_away_while_it_is_read_is_not_called_damaged(tiny_run, tmp_path, monkeypatch, read):
    """`sample RUN` during training with checkpoint.every=1 total_limit=1: the newest checkpoint goes between
    being chosen and its weights (or its progress.json) being read. The newest one is read instead."""
    run = training_run(tiny_run, tmp_path)
    real = getattr(checkpoints_mod, read)
    rotations = []

    def rotated_first(path, *args, **kwargs):
        if not rotations:
            rotations.append(path)
            train_one_more_step(run)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_mod, read, rotated_first)
    model = load_model(run.root)
    assert "step-000006" in str(rotations[0]), "the read began with the newest checkpoint of the time"
    assert model.source.startswith(str(run.checkpoint(7))) and model.info["step"] == 7
    assert [c.name for c in run.checkpoints()] == ["step-000007"]


def test_a_damaged_newest_checkpoint_is_still_called_damaged(tiny_run, tmp_path):
    """Only a checkpoint that is gone is passed over: one still in place that cannot be read is reported."""
    run = training_run(tiny_run, tmp_path)
    weights = run.checkpoint(6) / "unet_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{weights} is not a readable safetensors file"):
        load_model(run.root)


def test_a_run_whose_checkpoints_keep_being_rotated_away_gives_up_with_a_remedy(tiny_run, tmp_path, monkeypatch):
    run = training_run(tiny_run, tmp_path)
    real = checkpoints_mod.read_progress

    def always_rotated(path):
        shutil.rmtree(path)
        return real(path)

    monkeypatch.setattr(checkpoints_mod, "read_progress", always_rotated)
    monkeypatch.setattr(checkpoints_mod, "ROTATION_RETRIES", 2)
    with pytest.raises(UserError, match="rotated away while it was read, 2 times in a row.*checkpoint.total_limit"):
        load_model(run.root)


# ---------------------------------------------------------------- Ctrl-C as the process exits


@pytest.mark.slow
def test_ctrl_c_during_the_shutdown_after_convert_prints_no_traceback(tiny_run, tmp_path):
    """torch's exit hooks run after `convert` has finished: a Ctrl-C then changes nothing, and prints nothing."""
    code = textwrap.dedent(f"""
        import atexit, os, signal, sys, time

        def ctrl_c():  # runs after every exit hook registered later, torch's among them
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            print("exit hook done", file=sys.stderr)

        atexit.register(ctrl_c)
        from difftool.cli.app import main
        sys.argv = ["difftool", "convert", {str(tiny_run)!r}, {str(tmp_path / "model.safetensors")!r}]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done" in proc.stderr and (tmp_path / "model.safetensors").is_file()
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]
    assert "exit hook done" in proc.stderr


def test_inspect_counts_a_file_rotated_away_after_the_listing_as_gone(tmp_path, monkeypatch):
    """`inspect RUN` sums the run's files; one deleted between the listing and its stat is not an internal error."""
    from difftool.models import describe

    (tmp_path / "kept.bin").write_bytes(b"x" * 10)
    (tmp_path / "rotated.bin").write_bytes(b"x" * 5)
    real_stat = Path.stat

    def stat(self, *args, **kwargs):  # the file is listed, then rotated away before its size is read
        if self.name == "rotated.bin":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(Path, "is_file", lambda self: self.suffix == ".bin")
    assert describe._size_on_disk(tmp_path) == 10
