"""The judge (evaluation/judge.py, training/judging.py): trained on a run's data, cached, refused where it cannot
learn, and read by `difftool evaluate --features RUN/eval/judge.pt` as by the evaluation during training."""

from __future__ import annotations

import csv
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

from difftool.evaluation import judge as judge_mod
from difftool.evaluation.features import load_extractor
from difftool.evaluation.judge import (
    CLASSES,
    TURNS,
    class_fidelity,
    fd_noise,
    held_out_split,
    judge_info,
    judgeable,
    paired_fd_noise,
    save_judge,
    train_judge,
)
from difftool.evaluation.metrics import gaussian_stats
from difftool.evaluation.verdict import verdict
from difftool.rundir import RunDir
from difftool.training.judging import difference_noise
from difftool.training.loop import train
from tests.conftest import assert_user_error, invoke, tiny_config
from tests.evaluation.conftest import colours

JUDGED = ["eval.every=2", "eval.num_samples=8", "eval.features=judge", "eval.reference=data", "eval.scheduler=ddim",
          "eval.steps=2", "eval.guidance_scale=1", "data.num_images=200", "train.max_steps=4"]


@pytest.fixture(autouse=True)
def quick_judge(monkeypatch):
    """Judges of a few dozen steps: the tests check what is made and kept, not how well it learns."""
    monkeypatch.setattr(judge_mod, "MIN_STEPS", 30)
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 30)


def test_a_judge_of_classes_learns_them_and_is_a_feature_network(tmp_path, monkeypatch):
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 200)
    images, labels = colours()
    held, rest = held_out_split(len(images), floor_images=10)
    module, report = train_judge(images, labels, ["red", "green", "blue"], held=held, train=rest, flips=True)
    assert report.kind == CLASSES and report.accuracy == 1.0 and report.held_out == len(held) == 24
    path = tmp_path / "judge.pt"
    path.write_bytes(save_judge(module))
    extractor = load_extractor(str(path))
    assert extractor.judge["classes"] == ["red", "green", "blue"] and extractor.distance_name == "FD_judge"
    features, probs = extractor(images[:6].repeat_interleave(4, -1).repeat_interleave(4, -2))  # any size: 32 px
    assert features.shape == (6, judge_mod.WIDTHS[-1]) and (probs.argmax(1) == labels[:6]).all()


def test_without_classes_it_learns_quarter_turns():
    images = torch.zeros(240, 3, 8, 8, dtype=torch.uint8)
    images[:, :, :3] = 255  # bright at the top: which way is up is plain to see
    held, rest = held_out_split(len(images), floor_images=10)
    module, report = train_judge(images, None, None, held=held, train=rest, flips=False)
    assert report.kind == TURNS and len(report.classes) == 4 and report.accuracy > 0.9
    assert judge_info(module)["judges"] == TURNS


def test_other_networks_are_not_judges(extractor_file):
    assert load_extractor(str(extractor_file)).judge is None


@pytest.mark.parametrize("count, per_class, resolution, fragment", [
    (100, None, 32, "at least 200 images"),
    (300, [290, 10], 32, "class 'b' has 10"),
    (300, None, 4, "at least 8 px"),
])
def test_data_it_cannot_judge(count, per_class, resolution, fragment):
    labels = None if per_class is None else torch.cat([torch.full((n,), i) for i, n in enumerate(per_class)])
    names = None if per_class is None else ["a", "b"]
    assert fragment in judgeable(count, labels, names, resolution)


def test_held_out_split_covers_the_floor_and_never_overlaps():
    held, rest = held_out_split(1000, floor_images=200)
    assert len(held) == 200 and len(rest) == 800 and not set(held.tolist()) & set(rest.tolist())
    assert len(held_out_split(10_000, floor_images=200)[0]) == 1000, "a tenth when that is more"


def test_class_fidelity_counts_what_the_judge_sees():
    probs = np.eye(3)[[0, 0, 1, 2, 0, 0]]
    figures = class_fidelity(probs, ["a", "b", "c"], ["a", "b", "b", "c", "a", "a"])
    assert figures == {"largest_class_share": 4 / 6, "right_class": 5 / 6}
    assert "right_class" not in class_fidelity(probs, ["a", "b", "c"], None), "unconditional samples"
    assert "right_class" not in class_fidelity(probs, ["a", "b", "c"], ["x"] * 6), "classes the judge does not know"


def test_the_noise_of_an_fd_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    reference = gaussian_stats(rng.normal(size=(4000, 8)))
    assert fd_noise(rng.normal(size=(1600, 8)), reference) < fd_noise(rng.normal(size=(100, 8)), reference) / 2


def test_paired_noise_cancels_what_two_evaluations_share():
    """Two evaluations draw from the same seeds: sample i of one is close to sample i of the other. The noise of the
    difference of their FDs, measured pair by pair, is then far below what independent draws would have."""
    rng = np.random.default_rng(0)
    reference = gaussian_stats(rng.normal(size=(4000, 8)))
    shared = rng.normal(size=(256, 8))
    a, b = shared + 0.05 * rng.normal(size=shared.shape), shared + 0.05 * rng.normal(size=shared.shape) + 0.02
    independent = np.hypot(fd_noise(a, reference), fd_noise(b, reference))
    assert paired_fd_noise(a, b, reference) < independent / 5


def test_training_judges_with_its_own_classifier_and_keeps_it(tmp_path):
    result = train(tiny_config(*JUDGED), tmp_path / "run")
    run = RunDir(result.run)
    facts = json.loads((run.eval_dir / "judge.json").read_text())
    assert facts["report"]["kind"] == CLASSES and facts["report"]["classes"] == ["circle", "square", "triangle",
                                                                                 "ring", "cross"]
    assert facts["floor_images"] == 8 and facts["floor"] > 0 and 0 < facts["data_mean"] < 255
    # The reference is the images the judge trained on: never the held-out ones the floor is made of.
    assert np.load(run.eval_dir / "reference.npz")["count"] == facts["report"]["trained_on"]
    evals = [json.loads(line) for line in run.metrics.read_text().splitlines() if "eval/num_samples" in line]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert record["eval/fd_judge_floor"] == facts["floor"] and record["eval/fd_judge_std"] > 0
        assert 0 <= record["eval/right_class"] <= 1 and 0.2 <= record["eval/largest_class_share"] <= 1
        assert abs(record["eval/brightness_error"]) < 255
    assert sorted(p.name for p in (run.eval_dir / "features").iterdir()) == ["step-000002.npy", "step-000004.npy"]
    assert np.load(run.eval_dir / "features" / "step-000004.npy").shape == (8, judge_mod.WIDTHS[-1])
    before = (run.eval_dir / "judge.pt").read_bytes()

    resumed = tiny_config(*JUDGED[:-1], "train.max_steps=6")
    train(resumed, run.root, resume=run.latest_checkpoint())
    assert (run.eval_dir / "judge.pt").read_bytes() == before, "a resumed run keeps its judge"


def test_evaluate_takes_the_run_s_judge_file(tmp_path, scratch_cwd):
    run = train(tiny_config(*JUDGED), tmp_path / "run").run
    out = tmp_path / "scores"
    result = invoke("evaluate", run, "--features", run / "eval" / "judge.pt", "--reference", "shapes",
                    "-n", "10", "--steps", "2", "--output", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.json").read_text())
    assert {"fd_judge", "fd_judge_std", "right_class", "largest_class_share"} <= set(record)
    assert "FD_judge" in result.output and f"{record['fd_judge']:.3f}" in result.output
    assert re.search(rf"right class +{record['right_class']:.1%}", result.output), result.output
    assert "is_mean" not in record, "no Inception Score from a judge's classes"
    # A folder `difftool sample` wrote says which class each PNG was made for: the same figures from it.
    assert invoke("sample", run, "-n", "10", "--steps", "2", "--output", tmp_path / "pngs").exit_code == 0
    result = invoke("evaluate", tmp_path / "pngs", "--features", run / "eval" / "judge.pt", "--reference", "shapes",
                    "--output", tmp_path / "png-scores")
    assert result.exit_code == 0, result.output
    assert {"fd_judge", "right_class"} <= set(json.loads((tmp_path / "png-scores" / "metrics.json").read_text()))


def test_a_sweep_with_the_judge_gives_each_setting_its_classes(tmp_path, scratch_cwd):
    """Which sampler keeps the classes is what a sweep with a judge is for: every setting's right class and
    largest class, the same figures a single evaluation of that setting gives."""
    run = train(tiny_config(*JUDGED), tmp_path / "run").run
    judged = ["--features", run / "eval" / "judge.pt", "--reference", "shapes", "-n", "10"]
    result = invoke("evaluate", run, *judged, "--sweep", "ddim:2,3", "--output", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    with (tmp_path / "sweep" / "results.csv").open() as f:
        rows = {row["steps"]: row for row in csv.DictReader(f)}
    assert "right" in result.output and "largest" in result.output and "IS" not in result.output
    assert f"{float(rows['3']['largest_class_share']):.1%}" in result.output
    single = invoke("evaluate", run, *judged, "--scheduler", "ddim", "--steps", "3", "--output", tmp_path / "one")
    assert single.exit_code == 0, single.output
    record = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for key in ("right_class", "largest_class_share"):
        assert float(rows["3"][key]) == pytest.approx(record[key])
    assert float(rows["3"]["fd_std"]) == pytest.approx(record["fd_judge_std"])
    assert all(0 <= float(row["right_class"]) <= 1 for row in rows.values())


def test_features_judge_alone_names_the_file_to_give(tmp_path, tiny_run, scratch_cwd):
    assert_user_error(invoke("evaluate", tiny_run, "--features", "judge", "--reference", "shapes"),
                      "RUN/eval/judge.pt")


def test_a_judge_asked_for_on_data_it_cannot_learn_is_refused_before_training(tmp_path, tiny_recipe, scratch_cwd):
    result = invoke("train", "--recipe", tiny_recipe, "--output", tmp_path / "run", *[a for o in JUDGED[:-2] for a in
                    ("--set", o)], "--set", "data.num_images=64")
    assert_user_error(result, "eval.features=judge", "at least 200 images")
    assert not (tmp_path / "run").exists(), "nothing written"


def test_the_verdict_says_what_to_do():
    judge = {"report": {"kind": "classes", "classes": list("ABCDEFGHIJ"), "accuracy": 0.96}}
    record = {"eval/fd_judge": 0.9, "eval/fd_judge_floor": 0.1, "eval/right_class": 0.32,
              "eval/largest_class_share": 0.12, "eval/brightness_error": 2.4}
    line = verdict(record, judge, run="runs/letters", step=4000)
    assert "right class 32% (the judge puts 96% of real images in theirs)" in line and "9.0× its floor" in line
    assert "not learned the classes yet" in line and "--resume runs/letters --max-steps 8000" in line
    learned = verdict({**record, "eval/fd_judge": 0.15, "eval/right_class": 0.93}, judge, run="r", step=9000)
    assert learned.endswith("as close to the data as the judge can tell")
    dark = verdict({**record, "eval/fd_judge": 0.15, "eval/right_class": 0.93, "eval/brightness_error": -9.0},
                   judge, run="r", step=9000)
    assert "darker than the data" in dark
    assert verdict({"eval/fid": 3.0}, judge, run="r", step=1) is None, "nothing to judge by"
    assert "crowd" not in verdict({**record, "eval/largest_class_share": 0.22}, judge, run="r", step=3000), \
        "ten classes, 22% in one: an unlearned model's squiggles, not a collapse"
    assert "crowd into one class" in verdict({**record, "eval/largest_class_share": 0.6}, judge, run="r", step=3000)
    collapsed = verdict({**record, "eval/fd_judge": 76.0}, judge, run="runs/letters", step=6000,
                        best={"step": 4000, "eval/fd_judge": 3.12})
    assert "got worse after step 4000 (FD_judge 3.12 there, 24× lower than now)" in collapsed
    assert collapsed.endswith("difftool sample runs/letters/checkpoints/best, or train again with a lower train.lr")
    assert "worse" not in verdict(record, judge, run="r", step=4000, best={"step": 3000, "eval/fd_judge": 0.8})
    assert verdict(record, judge, run="r", step=4000, ended=None).endswith("not learned the classes yet"), \
        "a run still training is not told to train longer"


def test_a_student_with_its_teachers_shortcomings_is_sent_to_the_teacher():
    """More distillation does not mend what the teacher's own samples lack: a student as good as its teacher, whose
    teacher falls short of the data, is told to train the teacher; one clearly worse than it, to distill longer."""
    judge = {"report": {"kind": "classes", "classes": list("ABCD"), "accuracy": 0.8}}
    student = {"eval/fd_judge": 3.3, "eval/fd_judge_floor": 0.1, "eval/right_class": 0.35,
               "eval/largest_class_share": 0.39, "eval/brightness_error": -0.5}
    weak_teacher = ("runs/sizes", {**student, "eval/fd_judge": 2.67, "eval/right_class": 0.28})
    line = verdict(student, judge, run="runs/sizes-distilled", step=1000, command="distill", teacher=weak_teacher)
    assert "not learned the classes yet, as its teacher's samples (right class 28%, FD_judge 26.7× the floor)" in line
    assert line.endswith("train the teacher further (difftool train --resume runs/sizes), then distill it again")
    behind = verdict({**student, "eval/right_class": 0.2}, judge, run="runs/s", step=1000, command="distill",
                     teacher=weak_teacher)
    assert behind.endswith("train longer with difftool distill --resume runs/s --max-steps 2000"), "3 points under it"
    far = verdict({**student, "eval/fd_judge": 3.5}, judge, run="runs/s", step=1000, command="distill",
                  teacher=("runs/sizes", {**student, "eval/fd_judge": 2.0, "eval/right_class": 0.28}))
    assert "distill --resume" in far, "1.75× its teacher's FD: the student has not caught up"
    good_teacher = ("runs/t", {**student, "eval/fd_judge": 0.15, "eval/right_class": 0.79})
    assert "distill --resume" in verdict(student, judge, run="runs/s", step=1000, command="distill",
                                         teacher=good_teacher)


def test_the_teachers_evaluation_is_read_from_its_run_folder(tmp_path):
    from difftool.reporting.judge import teacher_evaluation

    run = RunDir(tmp_path / "teacher")
    run.root.mkdir()
    run.config.write_text("recipe: quickstart\n")
    records = [{"step": 100, "loss": 0.1},
               {"step": 200, "eval/fd_judge": 2.0, "eval/fd_judge_floor": 0.1, "eval/right_class": 0.3},
               {"step": 300, "eval/fd_judge": 2.5, "eval/fd_judge_floor": 0.1, "eval/right_class": 0.25},
               {"step": 400, "eval/fid": 9.0}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert teacher_evaluation(str(run.root / "model")) == (str(run.root), {
        "eval/fd_judge": 2.5, "eval/fd_judge_floor": 0.1, "eval/right_class": 0.25}), "its newest judged evaluation"
    assert teacher_evaluation(str(tmp_path / "elsewhere")) is None and teacher_evaluation(None) is None
    assert teacher_evaluation("a" * 5000) is None and teacher_evaluation("x\0y") is None, "a hostile config's name"
    run.metrics.write_text(json.dumps(records[-1]) + "\n")
    assert teacher_evaluation(str(run.root)) is None, "never judged"


def test_a_run_the_plateau_rule_ended_is_not_told_to_train_longer():
    """train.until: plateau stopped it because the judge saw no more gain: more steps are not the advice."""
    judge = {"report": {"kind": "classes", "classes": list("ABCDEFGHIJ"), "accuracy": 1.0}}
    close = {"eval/fd_judge": 0.525, "eval/fd_judge_floor": 0.233, "eval/right_class": 0.94,
             "eval/largest_class_share": 0.12, "eval/brightness_error": 0.0}
    assert "more training may still" in verdict(close, judge, run="r", step=11000)
    assert verdict(close, judge, run="r", step=11000, ended="levelled").endswith(
        "close to the data, as close as train.until: plateau found this model gets")
    unlearned = verdict({**close, "eval/right_class": 0.5}, judge, run="r", step=11000, ended="levelled")
    assert "train longer" not in unlearned and unlearned.endswith("try a wider model (model.block_out_channels) "
                                                                 "or more images")


def test_kept_features_that_are_not_plain_files_are_passed_over(tmp_path):
    """A FIFO or a link in RUN/eval/features neither hangs the rule nor is read through: its noise is unknown."""
    run = RunDir(tmp_path / "run")
    folder = run.eval_dir / "features"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "step-000002.npy")
    np.save(tmp_path / "elsewhere.npy", np.zeros((4, 64), np.float32))
    (folder / "step-000004.npy").symlink_to(tmp_path / "elsewhere.npy")
    np.save(folder / "step-000006.npy", np.zeros((4, 64), np.float32))
    signal.alarm(20)  # a read that blocks on the FIFO fails the test instead of hanging it
    try:
        assert difference_noise(run, None, 2, 6) is None and difference_noise(run, None, 4, 6) is None
    finally:
        signal.alarm(0)
