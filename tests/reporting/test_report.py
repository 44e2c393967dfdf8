"""difftool report: the page of a tiny real run, self-contained, on runs finished, training, resumed and old."""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from difftool import __version__
from difftool.evaluation.evaluate import MetricOptions, evaluate
from difftool.evaluation.sweep import sweep
from difftool.reporting.history import eval_history, read_history, smooth
from difftool.reporting.page import make_report
from difftool.reporting.timeline import pick_evenly
from difftool.rundir import RunDir, lock_name
from difftool.sampling.job import SampleRequest
from difftool.sessions import read_sessions
from difftool.training.loop import train
from difftool.training.plan import plan_training
from tests.conftest import FIXTURE_RUN, assert_user_error, invoke, tiny_config
from tests.reporting.conftest import (
    assert_self_contained,
    copy_run,
    eval_line,
    page_images,
)
from tests.training.conftest import interrupt_at


def test_report_of_a_finished_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    made = make_report(run.root, places=[tmp_path / "evaluations"])
    assert made.path == run.report
    page = run.report.read_text()
    assert_self_contained(page)
    images = page_images(page)
    assert len(images) == 3 + 2  # loss, lr, img/s; the grids of steps 3 and 6
    assert all(image.width > 20 and image.height > 20 for image in images)
    for text in ("Training loss", "Learning rate", "Training speed", "step 3", "step 6", "finished at step 6",
                 "6 of 6", "1 process(es) on cpu", f"difftool {__version__} (diffusers", "No evaluation during training",
                 "eval.every", "model.block_out_channels", "No evaluation of this run found"):
        assert text in page, text
    sessions = read_sessions(run.sessions)
    assert len(sessions) == 1 and sessions[0].end["outcome"] == "finished" and sessions[0].end["step"] == 6


def test_the_command_writes_the_page_and_says_where(tiny_run, tmp_path, scratch_cwd):
    run = copy_run(tiny_run, tmp_path)
    result = invoke("report", run.root)
    assert result.exit_code == 0, result.output
    assert str(run.report) in " ".join(result.output.split()) and "2 preview grids" in result.output
    assert run.report.is_file()
    assert invoke("report", run.root, "-o", tmp_path / "elsewhere.html").exit_code == 0
    assert (tmp_path / "elsewhere.html").is_file()


def test_evaluations_during_training_mark_the_best_step(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    with run.metrics.open("a") as f:
        f.write(eval_line(3, 30.0, 0.02, **{"eval/best_step": 3}))
        f.write(eval_line(6, 20.0, 0.01, **{"eval/best_step": 6}))
    evals = eval_history(read_history(run))
    assert (evals.key, evals.name, evals.best_step, evals.best_value) == ("fid", "FID", 6, 20.0)
    assert evals.kid.values == [0.02, 0.01] and evals.distance.steps == [3, 6]
    assert read_history(run).series("loss").steps == [1, 2, 3, 4, 5, 6], "eval lines are not training lines"
    made = make_report(run.root, places=[])
    page = made.path.read_text()
    assert made.has_eval_history and "Best step 6: FID 20" in page and "★" in page
    assert "No evaluation during training" not in page
    assert len(page_images(page)) == 3 + 1 + 2


def test_the_best_step_without_a_record_is_the_lowest_distance():
    from difftool.reporting.history import History

    lines = [{"step": 2, "eval/fd_dinov2": 5.0, "eval/kid": 0.1}, {"step": 4, "eval/fd_dinov2": 3.0},
             {"step": 6, "eval/fd_dinov2": 4.0, "eval/kid": 0.2}]
    evals = eval_history(History([], lines, 0))
    assert (evals.name, evals.best_step, evals.best_value) == ("FD_DINOv2", 4, 3.0)
    assert evals.kid.steps == [2, 6]
    assert eval_history(History([{"step": 1, "loss": 1.0}], [], 0)) is None


def test_a_half_written_last_line_is_left_out_and_counted(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    with run.metrics.open("a") as f:
        f.write('{"step": 7, "loss": 0.12, "lr": 0.0')  # a writer caught mid-line
    history = read_history(run)
    assert history.damaged_lines == 1 and history.last_step == 6
    page = make_report(run.root, places=[]).path.read_text()
    assert "1 line(s) of metrics.jsonl could not be read" in page


def test_a_run_still_training_is_reported_without_its_lock(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    lock = run.root / lock_name("train")
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-01-01 10:00:00"})
    lock.write_text(owner)
    start = run.sessions.read_text().splitlines()[0]
    run.sessions.write_text(start + "\n")  # the session has not ended
    page = make_report(run.root, places=[]).path.read_text()
    assert "training now (at step 6 of 6; pid" in page and "running" in page
    assert lock.read_text() == owner, "the report leaves the training's lock alone"

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(owner.replace(str(os.getpid()), str(dead.pid)))  # left by a training that was killed
    run.trim_metrics(4)
    page = make_report(run.root, places=[]).path.read_text()
    assert "killed (its last session recorded no end) at step 4 of 6; continue with" in page


def test_what_the_run_says_is_escaped(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    hostile = "<script>alert(1)</script>"
    run.config.write_text(run.config.read_text().replace("recipe: quickstart", f"recipe: '{hostile}'"))
    page = make_report(run.root, places=[]).path.read_text()
    assert hostile not in page and html.escape(hostile) in page


def test_a_run_of_difftool_0_1_0_and_its_resumed_session(tmp_path):
    old = Path(shutil.copytree(FIXTURE_RUN, tmp_path / "old-run"))
    page = make_report(old, places=[]).path.read_text()
    assert_self_contained(page)
    assert len(page_images(page)) == 3 + 1
    assert "Sessions (start, end, hardware of each `difftool train`): not recorded" in page
    assert "difftool 0.1.0 (diffusers 0.42.1" in page  # from its checkpoint
    plan = plan_training(resume=str(old), values={"train.max_steps": 4})
    train(plan.cfg, plan.output, resume=plan.resume)
    page = make_report(old, places=[]).path.read_text()
    assert "finished at step 4" in page and "(the first 2 steps: not recorded)" in page
    assert "step-000002" in page  # resumed from


def test_a_resumed_run_shows_both_sessions(tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 4)
    stopped = train(tiny_config("train.max_steps=8"), tmp_path / "run")
    monkeypatch.undo()
    assert "difftool report" in " ".join(capsys.readouterr().err.split()), "train says where the report is made"
    page = make_report(stopped.run, places=[]).path.read_text()
    assert "stopped (Ctrl-C or a signal) at step 4 of 8; continue with difftool train --resume" in page
    plan = plan_training(resume=str(stopped.run))
    train(plan.cfg, plan.output, resume=plan.resume)
    sessions = read_sessions(RunDir(stopped.run).sessions)
    assert [(s.start["step"], s.end["step"], s.end["outcome"], s.start["resumed_from"]) for s in sessions] == [
        (0, 4, "stopped", None), (4, 8, "finished", "step-000004")]
    page = make_report(stopped.run, places=[]).path.read_text()
    assert "finished at step 8" in page and "over 2 sessions" in page and "step-000004" in page


def test_the_runs_evaluations_and_sweeps_are_found(tiny_run, tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where evaluate writes evaluations/NAME by default
    run = copy_run(tiny_run, tmp_path)
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    evaluate("runs/run", reference="shapes", options=options, request=SampleRequest(num_images=10, steps=2))
    sweep("runs/run", "ddim:2,3", reference="shapes", options=options, request=SampleRequest(num_images=10),
          output=Path("evaluations/run-sweep"))
    other = Path("evaluations/other")  # an evaluation of another model: not this run's
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"fd": 1.0, "sampling": {"model": str(extractor_file)}}))
    made = make_report(run.root)
    page = made.path.read_text()
    assert made.evaluations == 2
    assert "Sweep run-sweep" in page and "ddim × 2" in page and "other" not in page
    assert len(page_images(page)) == 3 + 2 + 1  # the sweep's FD-vs-NFE figure


def test_a_guidance_sweep_shows_its_scales(tiny_run, tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = copy_run(tiny_run, tmp_path)
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    sweep("runs/run", "ddim:2;guidance:1,3", reference="shapes", options=options,
          request=SampleRequest(num_images=6), output=Path("evaluations/run-sweep"))
    page = make_report(run.root).path.read_text()
    assert "<th>guidance</th><th>NFE</th>" in page
    assert "<td>ddim</td><td>2</td><td>1</td><td>2</td>" in page and "<td>ddim</td><td>2</td><td>3</td><td>4</td>" in page


def test_many_grids_are_thinned_evenly(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    for step in range(9, 100, 3):
        shutil.copy(run.sample_grid(3), run.sample_grid(step))
    made = make_report(run.root, places=[], max_grids=5)
    page = made.path.read_text()
    assert (made.grids_shown, made.grids_total) == (5, 33)
    assert "5 of 33 grids, evenly spaced" in page and "step 3<" in page and "step 99<" in page
    assert pick_evenly(list(range(10)), 4) == [0, 3, 6, 9] and pick_evenly([1, 2], 5) == [1, 2]


def test_smoothing_follows_the_trend_and_leaves_short_curves_alone():
    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    noisy = [10.0 + (-1) ** i for i in range(200)]
    assert all(abs(v - 10.0) < 0.2 for v in smooth(noisy)[50:])


def test_refusals(tiny_run, tmp_path, scratch_cwd):
    assert_user_error(invoke("report", tmp_path), "is not a difftool run folder", "runs/quickstart-shapes")
    run = copy_run(tiny_run, tmp_path)
    notes = tmp_path / "notes.html"
    notes.write_text("mine")
    assert_user_error(invoke("report", run.root, "-o", notes), "is not a difftool report", "--overwrite")
    assert notes.read_text() == "mine"
    assert invoke("report", run.root, "-o", notes, "--overwrite").exit_code == 0
    assert invoke("report", run.root, "-o", notes).exit_code == 0, "a report is replaced"
    assert_user_error(invoke("report", run.root, "-o", run.config, "--overwrite"), "never writes over")
    assert_user_error(invoke("report", run.root, "-o", tmp_path), "is a folder")


def test_what_auto_became_is_not_an_override():
    from difftool.config import load_config, to_dict
    from difftool.reporting.facts import _overrides

    config = to_dict(load_config("folder32", ["model.class_conditional=true", "train.lr=0.0005"]))
    assert [o.key for o in _overrides(config, "folder32")] == ["train.lr"]


def test_a_run_with_sample_trajectory_shows_its_newest_strip(tmp_path):
    """sample.trajectory: each preview also writes its first image's trajectory; the page shows the newest one
    under the grids (and no grid count changes: the strip is no grid)."""
    result = train(tiny_config("sample.trajectory=3"), tmp_path / "run")
    run = RunDir(result.run)
    strips = sorted(p.name for p in run.samples_dir.glob("*-trajectory.png"))
    assert strips == ["step-000003-trajectory.png", "step-000006-trajectory.png"]
    page = make_report(run.root, places=[]).path.read_text()
    assert "How the first image came out of the noise at step 6" in page
    assert 'alt="trajectory of the first preview image at step 6"' in page
    assert len(page_images(page)) == 3 + 2 + 1  # the charts, the grids of steps 3 and 6, the newest strip
    no_strips = copy_run(result.run, tmp_path / "plain")
    for strip in no_strips.samples_dir.glob("*-trajectory.png"):
        strip.unlink()
    assert "came out of the noise" not in make_report(no_strips.root, places=[]).path.read_text()
