"""The installed CLI end to end: two gloo processes (DDP on CPU) and Ctrl-C handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from difftool.reporting.page import make_report
from difftool.rundir import RunDir
from difftool.sessions import read_sessions
from difftool.training.loop import train
from difftool.training.plan import plan_training
from tests.conftest import difftool_cmd, free_port, tiny_config

pytestmark = pytest.mark.slow


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in RunDir(run).metrics.read_text().splitlines()]


def test_two_process_ddp_matches_one_process(tmp_path, tiny_recipe):
    """Each rank trains on its half of the global batch; averaged gradients equal the full batch's."""
    reference = train(tiny_config(), tmp_path / "one")
    cmd = difftool_cmd() + ["train", "--recipe", str(tiny_recipe), "--output", str(tmp_path / "two"),
                            "--num-processes", "2", "--main-process-port", str(free_port()), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stderr
    run = RunDir(tmp_path / "two")
    assert [p.name for p in run.checkpoints()] == ["step-000003", "step-000006"]
    assert (run.checkpoints()[-1] / "random_states_1.pkl").is_file(), "each rank saves its RNG state"
    torch.testing.assert_close(losses(run.root), losses(reference.run), rtol=1e-4, atol=1e-5)
    assert len(losses(run.root)) == 6, "only the main process writes metrics"
    sessions = read_sessions(run.sessions)
    assert len(sessions) == 1 and sessions[0].start["processes"] == 2 and sessions[0].end["outcome"] == "finished"
    assert " ".join(proc.stderr.split()).count(f"difftool report {run.root}") == 1
    page = make_report(run.root, places=[]).path.read_text()
    assert "2 process(es) on cpu" in page and "finished at step 6" in page


def train_two(tmp_path, recipe, settings: list[str]) -> subprocess.CompletedProcess:
    """`difftool train` of `recipe` with `settings` on two processes into tmp_path/two."""
    cmd = difftool_cmd() + ["train", "--recipe", str(recipe), "--output", str(tmp_path / "two"),
                            *[arg for item in settings for arg in ("--set", item)],
                            "--num-processes", "2", "--main-process-port", str(free_port()), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_evaluate_during_training(tmp_path, tiny_recipe, extractor_file):
    """Each rank samples its share of the seeds; the main process scores, writes each record once and keeps the
    best checkpoint, which both ranks save their part of."""
    evaluation = ["eval.every=3", "eval.num_samples=10", f"eval.features={extractor_file}", "eval.scheduler=ddim",
                  "eval.steps=2", "sample.every=100", "checkpoint.total_limit=1"]
    proc = train_two(tmp_path, tiny_recipe, evaluation)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(tmp_path / "two")
    evals = [r for r in map(json.loads, run.metrics.read_text().splitlines()) if "eval/fd" in r]
    assert [(r["step"], r["eval/num_samples"]) for r in evals] == [(3, 10), (6, 10)]
    best = json.loads((run.best_checkpoint / "progress.json").read_text())
    assert best["step"] == evals[-1]["eval/best_step"] == min(evals, key=lambda r: r["eval/fd"])["step"]
    assert (run.best_checkpoint / "random_states_1.pkl").is_file(), "each rank saves its part of the best state"
    assert [p.name for p in run.checkpoints()] == ["step-000006"]

    resumed = subprocess.run(difftool_cmd() + ["train", "--resume", str(run.root), "--max-steps", "9", "--num-processes",
                                               "2", "--main-process-port", str(free_port()), "--quiet"],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = [r for r in map(json.loads, run.metrics.read_text().splitlines()) if "eval/fd" in r]
    assert after[:2] == evals and [r["step"] for r in after] == [3, 6, 9], "the history goes on, the best is kept"
    assert after[-1]["eval/best_step"] == min(after, key=lambda r: r["eval/fd"])["step"]


def test_two_processes_train_until_the_judge_levels_off(tmp_path, tiny_recipe):
    """The main process alone has the judge's scores; every rank takes the rule's decision and stops at its end
    (a rank that went on would wait forever at the next collective)."""
    plateau = ["train.until=plateau", "train.lr_schedule=constant", "train.max_steps=4", "train.until_max_steps=12",
               "eval.every=2", "eval.features=judge", "eval.num_samples=8", "eval.scheduler=ddim", "eval.steps=2",
               "eval.guidance_scale=1", "data.num_images=200", "sample.every=100"]
    proc = train_two(tmp_path, tiny_recipe, plateau)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(tmp_path / "two")
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    decided = [r for r in records if "until/decided" in r]
    assert len(decided) == 1, "one decision, written once"
    assert max(r["step"] for r in records if "loss" in r) == decided[0]["until/end"] <= 12
    assert read_sessions(run.sessions)[0].end["outcome"] == "finished"
    assert (run.eval_dir / "judge.pt").is_file() and "judge at step" in " ".join(proc.stderr.split())


def test_ctrl_c_saves_a_checkpoint_and_exits_0(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    cmd = difftool_cmd() + ["train", "--recipe", str(tiny_recipe), "--output", str(out), "--max-steps", "100000",
                            "--set", "checkpoint.every=100000", "--set", "sample.every=100000", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped at step" in err and "--resume" in err
    checkpoint = RunDir(out).latest_checkpoint()
    assert checkpoint is not None
    step = json.loads((checkpoint / "progress.json").read_text())["step"]
    assert 2 <= step < 100000

    # The resume runs in-process: the interruption is what needs a process of its own.
    plan = plan_training(resume=str(out), values={"train.max_steps": step + 2})
    assert train(plan.cfg, plan.output, resume=plan.resume).finished
    assert RunDir(out).latest_checkpoint().name == f"step-{step + 2:06d}"
    assert (out / "model" / "model_index.json").is_file()


def test_ddp_data_error_ends_every_process(tmp_path, tiny_recipe):
    """A data error on the main process must not leave the other rank waiting at a barrier."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = difftool_cmd() + ["train", "--recipe", str(tiny_recipe), "--dataset", str(empty), "--output",
                            str(tmp_path / "run"), "--num-processes", "2", "--main-process-port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("difftool: error: no images found") == 1, proc.stderr[-3000:]  # rank 0 speaks
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_under_ddp_saves_one_checkpoint_and_exits_0(tmp_path, tiny_recipe):
    """Ctrl-C in a terminal signals the launcher's process group; torch's agent starts each worker in a
    session of its own and passes the signal on. Exit 0 with accelerate before 1.16 and from 1.16 on
    (which turns the agent's exception into exit 130)."""
    out = tmp_path / "run"
    cmd = difftool_cmd() + ["train", "--recipe", str(tiny_recipe), "--output", str(out), "--max-steps", "100000",
                            "--set", "checkpoint.every=100000", "--set", "sample.every=100000", "--num-processes", "2",
                            "--main-process-port", str(free_port()), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 12:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert "internal error" not in err and "Traceback" not in err
    assert err.count("stopped at step") == 1
    (checkpoint,) = RunDir(out).checkpoints()
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert int(checkpoint.name.split("-")[1]) % 10 == 0  # the processes agree every 10 steps
