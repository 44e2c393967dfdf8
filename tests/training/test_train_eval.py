"""Evaluation during training (the `eval:` section): records, the best checkpoint, resume, refusals, img/s."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from difftool.config import EvalConfig
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.rundir import RunDir
from difftool.training import evaluator as evaluator_mod
from difftool.training import loop as train_mod
from difftool.training.loop import train
from difftool.training.plan import plan_training
from tests.conftest import TINY_OVERRIDES, assert_user_error, invoke, tiny_config

EVAL_KEYS = {"step", "eval/fid", "eval/kid", "eval/kid_std", "eval/num_samples", "eval/seconds", "eval/best_step",
             "eval/brightness_error"}


def eval_overrides(features: str = "inception", every: int = 3) -> list[str]:
    return [f"eval.every={every}", "eval.num_samples=6", f"eval.features={features}", "eval.reference=data",
            "eval.reference_images=null", "eval.scheduler=ddim", "eval.steps=2", "eval.guidance_scale=1"]


def records(run) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of metrics.jsonl."""
    lines = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/num_samples" in r]


def best_progress(run) -> dict:
    return json.loads((RunDir(run).best_checkpoint / "progress.json").read_text())


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Inception file in the hub cache, and no network to download it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))

    def fail(url, dst, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


def test_evaluations_at_their_steps_and_the_best_checkpoint(tmp_path, hub_inception):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(*eval_overrides(), "train.max_steps=7", "checkpoint.total_limit=1", "log.trackers=[tensorboard]")
    result = train(cfg, tmp_path / "run")
    run = RunDir(result.run)
    training, evals = records(run.root)
    assert [r["step"] for r in training] == list(range(1, 8)), "training records keep their keys and steps"
    assert [r["step"] for r in evals] == [3, 6, 7], "every eval.every steps, and at the last"
    for record in evals:
        assert set(record) == EVAL_KEYS
        assert math.isfinite(record["eval/fid"]) and record["eval/num_samples"] == 6
        so_far = [r for r in evals if r["step"] <= record["step"]]
        assert record["eval/best_step"] == min(so_far, key=lambda r: r["eval/fid"])["step"]
    assert (run.eval_dir / "reference.npz").is_file(), "the statistics of the run's data are cached in RUN/eval"

    # checkpoints/best: the state of the best evaluation, kept through rotation (total_limit=1), loadable.
    assert [p.name for p in run.checkpoints()] == ["step-000007"] and run.latest_checkpoint().name == "step-000007"
    progress = best_progress(run.root)
    assert progress["step"] == evals[-1]["eval/best_step"]
    assert progress["eval"]["eval/fid"] == min(r["eval/fid"] for r in evals)
    assert (run.best_checkpoint / "model.safetensors").is_file() and (run.best_checkpoint / "unet_ema").is_dir()
    best = load_model(run.best_checkpoint)
    assert best.info["resolution"] == 8 and best.weights == "ema"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(run.logs_dir / "difftool")).Reload()  # the scalars; hparams are in a sub-folder
    assert [e.step for e in logged.Scalars("eval/fid")] == [3, 6, 7]


def test_the_best_checkpoint_samples_and_converts(tmp_path, hub_inception, scratch_cwd):
    result = train(tiny_config(*eval_overrides(), "train.max_steps=3"), tmp_path / "run")
    best = RunDir(result.run).best_checkpoint
    sampled = invoke("sample", best, "-n", "2", "--steps", "2", "--output", tmp_path / "s", "-q")
    assert sampled.exit_code == 0, sampled.output
    converted = invoke("convert", best, tmp_path / "model")
    assert converted.exit_code == 0, converted.output
    assert (tmp_path / "model" / "model_index.json").is_file()


def test_other_feature_networks_name_their_distance_as_evaluate_does(tmp_path, extractor_file):
    result = train(tiny_config(*eval_overrides(str(extractor_file)), "train.max_steps=3"), tmp_path / "run")
    (record,) = records(result.run)[1]
    assert "eval/fd" in record and "eval/fid" not in record
    assert best_progress(result.run)["eval"]["eval/fd"] == record["eval/fd"]


def interrupt_at(monkeypatch, step: int) -> None:
    monkeypatch.setattr(train_mod._Trainer, "_agree_to_stop", lambda self, s: s == step)


def test_resume_keeps_the_evaluation_history_and_the_best(tmp_path, hub_inception):
    settings = (*eval_overrides(every=2), "train.max_steps=6", "checkpoint.every=100")
    full = train(tiny_config(*settings), tmp_path / "full")
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 5)  # evaluated at 2 and 4, checkpoint at 5 (no evaluation when stopping)
        stopped = train(tiny_config(*settings), tmp_path / "part")
    assert [r["step"] for r in records(stopped.run)[1]] == [2, 4]

    plan = plan_training(resume=str(stopped.run))
    assert plan.resume.name == "step-000005", "checkpoints/best is never the checkpoint to resume"
    train(plan.cfg, plan.output, resume=plan.resume)
    resumed, uninterrupted = records(stopped.run)[1], records(full.run)[1]
    assert [r["step"] for r in resumed] == [2, 4, 6], "the history continues, without duplicates"
    for a, b in zip(resumed, uninterrupted, strict=True):  # exact resume: the same samples, the same scores
        assert a["eval/fid"] == pytest.approx(b["eval/fid"], rel=1e-6) and a["eval/best_step"] == b["eval/best_step"]


def test_a_resumed_run_replaces_the_best_only_with_a_better_score(tmp_path, hub_inception):
    settings = (*eval_overrides(every=2), "train.max_steps=2", "checkpoint.every=100")
    run = train(tiny_config(*settings), tmp_path / "run").run
    progress = best_progress(run)
    progress["eval"]["eval/fid"] = -1.0  # a score no later evaluation beats
    (RunDir(run).best_checkpoint / "progress.json").write_text(json.dumps(progress))
    plan = plan_training(resume=str(run), values={"train.max_steps": 6})
    train(plan.cfg, plan.output, resume=plan.resume)
    assert [(r["step"], r["eval/best_step"]) for r in records(run)[1]] == [(2, 2), (4, 2), (6, 2)]
    assert best_progress(run)["step"] == 2 and best_progress(run)["eval"]["eval/fid"] == -1.0


def test_evaluation_time_is_not_training_time(tmp_path, extractor_file, monkeypatch):
    """img/s counts training steps only: an evaluation that takes 1000 s (on a shifted clock) shows in
    eval/seconds and in no training record."""
    shift = [0.0]
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + shift[0])
    score = evaluator_mod.sample_and_score

    def slow(*args, **kwargs):
        shift[0] += 1000.0
        return score(*args, **kwargs)

    monkeypatch.setattr(evaluator_mod, "sample_and_score", slow)
    result = train(tiny_config(*eval_overrides(str(extractor_file), every=2), "train.max_steps=6", "log.every=2"),
                   tmp_path / "run")
    training, evals = records(result.run)
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["eval/seconds"] >= 1000 for r in evals)
    assert all(r["img_per_s"] > 16 / 100 for r in training), [r["img_per_s"] for r in training]


def test_missing_features_or_reference_are_refused_before_training(tmp_path, extractor_file):
    for setting, message in [(f"eval.features={tmp_path / 'nope.pt'}", "the feature extractor file .*nope.pt does not exist"),
                             (f"eval.reference={tmp_path / 'no-folder'}", "--reference .*no-folder"),
                             ("eval.scheduler=ddmi", "unknown scheduler 'ddmi'")]:
        features = [] if "features" in setting else [f"eval.features={extractor_file}"]
        cfg = tiny_config(*eval_overrides(str(extractor_file)), *features, setting)
        with pytest.raises(UserError, match=f"cannot evaluate during training: {message}.*--set eval.every=0"):
            train(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists(), "nothing written, no step trained"


def test_cli_refuses_an_evaluation_asked_for_that_cannot_run(tmp_path, offline, scratch_cwd):
    sets = [arg for item in TINY_OVERRIDES[:-1] for arg in ("--set", item)]
    result = invoke("train", *sets, "--set", "eval.every=3", "--set", "eval.features=inception", "--output",
                    tmp_path / "run")
    assert_user_error(result, "cannot evaluate during training: the FID Inception weights are not in",
                      "set eval.inception_weights=FILE", "--set eval.every=0")
    assert not (tmp_path / "run").exists()


def test_the_quickstart_evaluates_offline_with_its_judge(tmp_path, offline, scratch_cwd, monkeypatch):
    """No download: the built-in recipe's evaluation is the judge's, trained on the run's own data."""
    monkeypatch.setattr("difftool.evaluation.judge.MAX_STEPS", 30)
    sets = [arg for item in TINY_OVERRIDES[:-1] for arg in ("--set", item)]  # all but eval.every=0
    result = invoke("train", *sets, "--set", "data.num_images=200", "--set", "eval.num_samples=8", "--set",
                    "eval.steps=2", "--output", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    evals = records(tmp_path / "run")[1]
    assert [r["step"] for r in evals] == [6] and "eval/fd_judge" in evals[0], "at the last step (every 1,000)"
    said = " ".join(result.stderr.split())
    assert "eval step 6: FD_judge " in said, "the distance under the name the verdict and the report give it"
    assert "judge at step 6: right class" in said, "the verdict ends the run"


def test_a_built_in_recipe_s_evaluation_it_cannot_run_is_turned_off(tmp_path, offline, scratch_cwd):
    """Not asked for, it is turned off with one line: Inception that cannot be had, or data the judge cannot learn."""
    sets = [arg for item in TINY_OVERRIDES[:-1] for arg in ("--set", item)]  # all but eval.every=0; 64 images
    result = invoke("train", *sets, "--max-steps", "2", "--output", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # rich wraps the line at the terminal's width
    assert said.count("evaluation during training off: eval.features=judge: the judge needs at least 200 images") == 1
    assert records(tmp_path / "run")[1] == [] and not RunDir(tmp_path / "run").best_checkpoint.exists()
    assert "every: 0" in RunDir(tmp_path / "run").config.read_text().split("eval:")[1]


def test_eval_settings_are_checked_with_the_config():
    with pytest.raises(UserError) as err:
        tiny_config("eval.every=-1", "eval.num_samples=1", "eval.steps=0", "eval.guidance_scale=0.5",
                    'eval.reference=""', "eval.reference_images=0")
    for fragment in ("eval.every must be >= 0", "eval.num_samples must be >= 2", "eval.steps must be > 0",
                     "eval.guidance_scale must be >= 1", "eval.reference must not be empty",
                     "eval.reference_images must be > 0"):
        assert fragment in str(err.value)
    assert EvalConfig().every == 0, "off unless asked for"


def test_only_a_built_in_recipe_s_evaluation_is_optional(tmp_path, tiny_recipe):
    assert plan_training().optional_eval, "the quickstart's own evaluation"
    assert not plan_training(overrides=["eval.num_samples=50"]).optional_eval, "asked for on the command line"
    assert not plan_training(recipe=str(tiny_recipe)).optional_eval, "the user's own recipe"
    run = train(tiny_config("train.max_steps=1"), tmp_path / "run").run
    assert not plan_training(resume=str(run), values={"train.max_steps": 2}).optional_eval, "a run's own config"
