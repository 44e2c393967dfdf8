"""difftool report on a run evaluated by its judge: the verdict on top, the floor, class fidelity and brightness
charts, the decision of `train.until: plateau`, and a judge.json that is damaged or hostile (no verdict, a page).

The run folders are written here by hand (config, metrics.jsonl, eval/judge.json), as training writes them: no
training, so these tests take seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from difftool.config import dump_yaml
from difftool.reporting.charts import class_figure, eval_figure
from difftool.reporting.history import (
    eval_history,
    is_distance,
    plateau_stop,
    read_history,
)
from difftool.reporting.judge import read_judge
from difftool.reporting.page import make_report
from difftool.rundir import RunDir
from tests.conftest import tiny_config
from tests.reporting.conftest import (
    NESTED,
    assert_self_contained,
    page_images,
    reported,
)

WHY = "FD_judge has not improved by more than its noise since step 100 (0.9 then, 0.8 at best since, noise 0.1)"
JUDGE = {"report": {"kind": "classes", "classes": ["circle", "square", "triangle", "ring", "cross"], "accuracy": 0.96,
                    "held_out": 1200, "trained_on": 10800, "seconds": 40.0},
         "data": {"source": "built-in shapes", "count": 12000, "resolution": 8, "flips": True, "classes": None},
         "network": "torchscript:0123456789ab", "floor": 0.47, "floor_std": 0.05, "floor_images": 500,
         "data_mean": 126.5}


def judged(step: int, fd: float, **more) -> dict:
    """An evaluation record of a class-conditional run evaluated by its judge."""
    return {"step": step, "eval/fd_judge": fd, "eval/kid": fd / 20, "eval/kid_std": 0.01, "eval/fd_judge_std": 0.1,
            "eval/fd_judge_floor": 0.47, "eval/right_class": 0.5, "eval/largest_class_share": 0.3,
            "eval/brightness_error": -2.5, "eval/num_samples": 500, "eval/seconds": 4.9, "eval/best_step": step,
            **more}


def until(step: int, end: int, decided: str = "levelled", why: str = WHY) -> dict:
    return {"step": step, "until/decided": decided, "until/from": step, "until/end": end, "until/why": why}


def make_run(root: Path, records: list[dict], judge: dict | None = JUDGE) -> RunDir:
    """A run folder as training leaves it: config.yaml, metrics.jsonl and, with `judge`, eval/judge.json."""
    run = RunDir(root)
    (root / "eval").mkdir(parents=True)
    run.config.write_text(dump_yaml(tiny_config("eval.every=100", "eval.features=judge")))
    training = [{"step": s, "loss": 1.0 / s, "lr": 0.001, "img_per_s": 100.0} for s in range(50, 401, 50)]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in sorted(training + records, key=lambda r: r["step"])))
    if judge is not None:
        (run.eval_dir / "judge.json").write_text(json.dumps(judge))
    return run


@pytest.fixture
def run(tmp_path) -> RunDir:
    """Evaluations at steps 100 to 400, the last one far from the floor with one class taking most samples."""
    return make_run(tmp_path / "run", [judged(100, 30.0), judged(200, 9.0), judged(300, 4.0),
                                       judged(400, 3.9, **{"eval/largest_class_share": 0.9})])


def page_of(run: RunDir) -> str:
    page = make_report(run.root, places=[]).path.read_text()
    assert_self_contained(page)
    page_images(page)
    return page


def legend_texts(figure) -> list[str]:
    return [t.get_text() for axes in figure.axes if axes.get_legend() for t in axes.get_legend().get_texts()]


def test_the_verdict_is_on_top_of_the_page(run):
    page = page_of(run)
    verdict = page.index('<section id="verdict"')
    assert verdict < page.index('<section id="run"') < page.index('<section id="eval"')
    said = page[verdict:page.index("</section>", verdict)]
    assert "judge at step 400" in said and "one class takes 90% of the samples" in said
    assert f"train longer with difftool train --resume {run.root} --max-steps 800" in said


def test_a_run_the_plateau_rule_ended_is_not_told_to_train_longer(run):
    with run.metrics.open("a") as f:
        f.write(json.dumps(until(300, 400)) + "\n")
    page = page_of(run)
    said = page[page.index('<section id="verdict"'):page.index('<section id="run"')]
    assert "train longer" not in said and "train.until: plateau saw no more gain, so more steps will not help" in said


def test_a_run_that_stopped_short_is_judged_without_advice(run):
    """Stopped (Ctrl-C) at step 400 of 1,000: it goes on with --resume; "train longer" is for finished runs."""
    now = time.time()
    run.sessions.write_text(json.dumps({"event": "start", "time": now - 60, "step": 0, "max_steps": 1000}) + "\n"
                            + json.dumps({"event": "end", "time": now, "step": 400, "outcome": "stopped"}) + "\n")
    page = page_of(run)
    said = page[page.index('<section id="verdict"'):page.index('<section id="run"')]
    assert "judge at step 400" in said and "train longer" not in said
    assert "stopped (Ctrl-C or a signal) at step 400" in page


def test_the_judge_has_its_charts_and_a_line_about_it(run):
    page = page_of(run)
    for alt in ("FD_judge and KID over steps", "Class fidelity over steps", "Brightness error over steps"):
        assert f'alt="{alt}"' in page, alt
    assert len(page_images(page)) == 3 + 3  # loss, lr, img/s; FD_judge and KID, class fidelity, brightness
    assert ("Judge: a 5-class classifier of the run&#x27;s data, 96% right on 1,200 held-out images (chance 20%); "
            "floor of FD_judge 0.47 at 500 images.") in page
    assert "FD_judge and KID during training" in page and "30 ± 0.1" in page
    evals, (judge, _) = eval_history(read_history(run)), read_judge(run)
    assert "floor (real vs real, 500 images)" in legend_texts(eval_figure(evals, floor_images=500))
    assert {"judge on real images (96%)", "1/5: chance; each class's share"} <= set(legend_texts(
        class_figure(evals, judge)))


def test_a_run_without_classes_or_judge_draws_only_what_it_has(tmp_path):
    records = [{k: v for k, v in judged(s, 5.0).items() if k not in ("eval/right_class", "eval/largest_class_share")}
               for s in (100, 200)]
    turns = {**JUDGE, "report": {**JUDGE["report"], "kind": "quarter turns",
                                 "classes": ["0°", "90°", "180°", "270°"]}}
    page = page_of(make_run(tmp_path / "turns", records, turns))
    assert "Class fidelity" not in page and 'alt="Brightness error over steps"' in page
    assert "Judge: a network that tells the quarter turns of the run&#x27;s images apart" in page
    fid = [{"step": 100, "eval/brightness_error": 9.0, "eval/fid": 20.0, "eval/kid": 0.1}]
    page = page_of(make_run(tmp_path / "fid", fid, judge=None))
    assert "FID and KID during training" in page and 'alt="Brightness error over steps"' in page
    assert "Verdict" not in page and "Judge:" not in page


def test_the_judges_other_figures_are_not_distances(run):
    for key in ("fd_judge_std", "fd_judge_floor", "right_class", "largest_class_share", "brightness_error", "kid",
                "kid_std", "fid_std"):
        assert not is_distance(key), key
    assert all(is_distance(key) for key in ("fid", "fd_dinov2", "fd", "fd_judge"))
    evals = eval_history(read_history(run))
    assert (evals.key, evals.name, evals.best_step) == ("fd_judge", "FD_judge", 400)
    assert evals.floor.values == [0.47] * 4 and evals.distance_std.values == [0.1] * 4
    history = read_history(run)
    history.evaluations = [{"step": 1, "eval/brightness_error": 3.0, "eval/right_class": 0.2, "eval/fid": 7.0}]
    assert eval_history(history).key == "fid"  # the first key is not taken for the distance
    history.evaluations = [{"step": 1, "eval/brightness_error": 3.0, "eval/fd_judge_floor": 0.4}]
    assert eval_history(history) is None


def test_the_plateau_rules_decision_is_marked_and_summed_up(run):
    with run.metrics.open("a") as f:
        f.write(json.dumps(until(300, 400)) + "\n")
    history = read_history(run)
    assert history.last_step == 400 and [r["step"] for r in history.decisions] == [300]
    assert all("until/decided" not in r for r in history.training + history.evaluations)
    stop = plateau_stop(history)
    assert (stop.step, stop.end, stop.decided, stop.reached) == (300, 400, "levelled", True)
    page = page_of(run)
    assert f"stopped by train.until: plateau at step 400 (decided at the evaluation of step 300): {WHY}" in page
    evals, (judge, _) = eval_history(history), read_judge(run)
    for figure in (eval_figure(evals, stop=stop), class_figure(evals, judge, stop)):
        assert {"until: levelled off", "stopped"} <= set(legend_texts(figure))
    with run.metrics.open("a") as f:
        f.write(json.dumps(until(400, 440, decided="limit", why="<b>$\\x$</b>")) + "\n")
    stop = plateau_stop(read_history(run))
    assert "until: limit reached" in legend_texts(eval_figure(evals, stop=stop)) and not stop.reached
    page = page_of(run)
    assert "stopping by train.until: plateau at step 440 (decided at the evaluation of step 400): &lt;b&gt;$\\x$&lt;/b&gt;" in page
    assert "<td>400 of 440</td>" in page  # the end the rule set, not the budget (train.max_steps)


def test_a_decision_the_run_trained_past_or_a_damaged_one_is_no_stop(run):
    with run.metrics.open("a") as f:
        f.write(json.dumps(until(200, 220)) + "\n")  # reopened: the budget was raised on resume
        f.write(json.dumps({"step": 300, "until/decided": 5, "until/end": "x"}) + "\n")
    assert plateau_stop(read_history(run)) is None
    assert "train.until" not in page_of(run)


@pytest.mark.parametrize("damage", ["deep", "not-json", "no-classes", "link", "fifo", "folder"])
def test_a_damaged_judge_json_gives_a_page_without_a_verdict(run, tmp_path, damage):
    path = run.eval_dir / "judge.json"
    path.unlink()
    if damage == "deep":
        path.write_text(NESTED)
    elif damage == "not-json":
        path.write_text('{"report": ')
    elif damage == "no-classes":
        path.write_text(json.dumps({**JUDGE, "report": {**JUDGE["report"], "classes": 5}}))
    elif damage == "link":
        (tmp_path / "elsewhere.json").write_text(json.dumps(JUDGE))
        path.symlink_to(tmp_path / "elsewhere.json")
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    page, said = reported(run)
    assert "Verdict" not in page and "Judge:" not in page and "judge at step" not in page
    assert f"Left out: {path}" in page and str(path) in said
    assert 'alt="Class fidelity over steps"' in page  # the figures of metrics.jsonl are still drawn


def test_figures_of_the_wrong_kind_do_not_cost_the_verdict(run):
    with run.metrics.open("a") as f:
        f.write(json.dumps(judged(500, 3.0, **{"eval/right_class": "most", "eval/brightness_error": None,
                                                "eval/largest_class_share": 0.9})) + "\n")
        f.write(json.dumps(judged(600, 2.0, **{"eval/fd_judge_floor": float("inf")})) + "\n")  # no floor: no verdict
    judge = {**JUDGE, "report": {**JUDGE["report"], "accuracy": "high", "held_out": -1}, "floor": [1]}
    (run.eval_dir / "judge.json").write_text(json.dumps(judge))
    page = page_of(run)
    said = page[page.index('<section id="verdict"'):page.index('<section id="run"')]
    assert "judge at step 500: FD_judge 6.4× its floor; one class takes 90% of the samples: " in said
    assert "right class" not in said and "brightness" not in said
    assert "Judge: a 5-class classifier of the run&#x27;s data." in page
