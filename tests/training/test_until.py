"""train.until (training/until.py): the plateau rule on synthetic score curves, its learning rate, its state."""

from __future__ import annotations

import json
import math

import pytest

from difftool.config import load_config
from difftool.errors import UserError
from difftool.evaluation import judge as judge_mod
from difftool.rundir import RunDir, read_progress
from difftool.training import loop as loop_mod
from difftool.training.loop import train
from difftool.training.plan import plan_training
from difftool.training.until import (
    COOLDOWN,
    LEVELLED,
    LIMIT,
    PATIENCE,
    Budget,
    Plateau,
    cooldown_steps,
    until_of,
)
from tests.conftest import TINY_OVERRIDES, tiny_config


def follow(rule: Plateau, curve, every: int, noise: float = 0.05, paired=None) -> list[dict]:
    """Evaluations every `every` steps with FD curve(step), until the rule's end; the decision records."""
    decisions, step = [], every
    while step <= rule.end():
        record = rule.observe(step, curve(step), noise, paired)
        decisions += [record] if record else []
        step += every
    return decisions


def levelling_at(level_step: int):
    """An FD that falls steeply until `level_step`, then stays flat within 1%."""
    return lambda step: 1.0 + 10 * max(0, level_step - step) / level_step + 0.01 * math.sin(step)


def test_stops_where_the_curve_levels_off_not_before_the_budget():
    rule = Plateau(budget=4000, limit=16000, warmup=100)
    decisions = follow(rule, levelling_at(10000), every=1000)
    assert [d["until/decided"] for d in decisions] == [LEVELLED]
    decided = decisions[0]["step"]
    # No gain over PATIENCE evaluations past the level step: decided PATIENCE evaluations after it.
    assert decided == 10000 + PATIENCE * 1000
    assert rule.end() == decided + math.ceil(COOLDOWN * decided) <= 1.2 * 10000 + PATIENCE * 1000
    assert "not improved" in decisions[0]["until/why"] and decisions[0]["until/end"] == rule.end()


def test_a_curve_flat_from_the_start_still_trains_the_budget():
    rule = Plateau(budget=4000, limit=16000, warmup=100)
    decisions = follow(rule, lambda step: 1.0, every=1000)
    assert decisions[0]["step"] == 4000, "no decision before the budget, the first one at it"
    assert rule.end() == 4000 + cooldown_steps(4000)


def test_gains_smaller_than_the_noise_do_not_keep_it_going():
    rule = Plateau(budget=2000, limit=16000, warmup=0)
    slow = follow(rule, lambda step: 5.0 - step * 1e-5, every=1000, noise=0.5)  # 0.01 per evaluation
    assert slow[0]["step"] == 1000 * (PATIENCE + 1), "at the first evaluation with PATIENCE before it"
    rule = Plateau(budget=2000, limit=16000, warmup=0)
    fast = follow(rule, lambda step: 5.0 - step * 2e-4, every=1000, noise=0.05)  # 0.2 per evaluation
    assert fast[0]["until/decided"] == LIMIT, "a curve that keeps falling trains to the limit"


def test_the_paired_noise_of_the_difference_is_used_where_it_is_measured():
    asked = []

    def paired(a: int, b: int) -> float:
        asked.append((a, b))
        return 0.01

    curve = lambda step: 5.0 - step * 2e-5  # noqa: E731 - 0.02 per evaluation: above 0.01, below hypot(0.5, 0.5)
    with_pairs = Plateau(budget=2000, limit=16000, warmup=0)
    assert follow(with_pairs, curve, every=1000, noise=0.5, paired=paired)[0]["until/decided"] == LIMIT
    assert asked[0] == (1000, 3000), "the score PATIENCE evaluations back against the best since"
    alone = Plateau(budget=2000, limit=16000, warmup=0)
    assert follow(alone, curve, every=1000, noise=0.5)[0]["step"] == 3000, "independent noise: levelled"


def test_the_limit_forces_a_cooldown_that_ends_on_it():
    rule = Plateau(budget=4000, limit=16000, warmup=100)
    decisions = follow(rule, lambda step: 100.0 / step, every=500, noise=0.0)
    assert [d["until/decided"] for d in decisions] == [LIMIT]
    assert rule.end() <= 16000 and rule.end() + 1 + cooldown_steps(rule.forced_start() + 1) > 16000
    assert rule.lr_factor(rule.end()) == 0.0 and rule.lr_factor(rule.forced_start() - 1) == 1.0


def test_a_curve_that_levels_off_inside_the_forced_cooldown_still_ends_on_the_limit():
    """The cooldown the limit forces has begun: the curve levelling then (as the rate falls, it may) does not restart
    the rate at full and carry the run past train.until_max_steps."""
    rule = Plateau(budget=4000, limit=8800, warmup=100)
    start = rule.forced_start()
    assert start == 8000
    decisions = follow(rule, lambda step: max(1.0, 9000.0 / step - 0.2 * (step >= 8000)), every=400, noise=0.01)
    assert [d["until/decided"] for d in decisions] == [LIMIT] and decisions[0]["step"] == 8000
    assert rule.end() == 8800 and rule.lr_factor(8400) == 0.5 and rule.lr_factor(8800) == 0.0


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    rule = Plateau(budget=100, limit=1000, warmup=10)
    assert [rule.lr_factor(s) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]
    rule.observe(100, 1.0, 0.0)
    rule.observe(200, 1.0, 0.0)
    rule.observe(300, 1.0, 0.0)  # no gain over two evaluations: cool down from step 300 over 30 steps
    assert rule.decided == 300 and rule.end() == 330
    assert [rule.lr_factor(s) for s in (299, 300, 315, 330)] == [1.0, 1.0, 0.5, 0.0]


def test_state_survives_a_resume_and_a_raised_budget_reopens_it():
    rule = Plateau(budget=4000, limit=16000, warmup=100)
    follow(rule, levelling_at(6000), every=1000)
    saved = rule.state()
    again = Plateau(budget=4000, limit=16000, warmup=100)
    again.restore(saved)
    assert (again.decided, again.end(), again.scores) == (rule.decided, rule.end(), rule.scores)
    assert again.observe(rule.scores[-1][0], 0.1, 0.0) is None, "an evaluation seen before is not counted twice"
    raised = Plateau(budget=20000, limit=40000, warmup=100)  # train --resume RUN --max-steps 20000
    raised.restore(saved)
    assert raised.decided is None and raised.end() > 20000


def test_steps_is_the_budget():
    budget = Budget(4000)
    assert budget.end() == 4000 and budget.observe(4000, 1.0, 0.0) is None and budget.state() == {}


def test_the_limit_defaults_to_four_times_the_budget():
    cfg = load_config("quickstart", [*TINY_OVERRIDES, "train.until=plateau", "train.lr_schedule=constant",
                                     "eval.every=2", "eval.features=judge", "train.max_steps=6"])
    assert isinstance(until_of(cfg, 6), Plateau) and until_of(cfg, 6).limit == 24


@pytest.mark.parametrize("overrides, fragment", [
    (["train.lr_schedule=cosine"], "set train.lr_schedule=constant"),
    (["eval.every=0"], "set eval.every"),
    (["eval.features=inception"], "eval.features=judge"),
    (["train.until_max_steps=3"], "must be at least train.max_steps"),
    (["train.until=forever"], "train.until must be one of steps, plateau"),
])
def test_plateau_settings_that_cannot_work_are_refused(overrides, fragment):
    base = [*TINY_OVERRIDES, "train.until=plateau", "train.lr_schedule=constant", "eval.every=2",
            "eval.features=judge"]
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config("quickstart", base + overrides)


def test_until_max_steps_without_plateau_is_refused():
    with pytest.raises(UserError, match="applies to train.until=plateau"):
        load_config("quickstart", [*TINY_OVERRIDES, "train.until_max_steps=100"])


PLATEAU_RUN = ["train.until=plateau", "train.lr_schedule=constant", "train.max_steps=4", "train.until_max_steps=12",
               "eval.every=2", "eval.features=judge", "eval.num_samples=8", "eval.reference=data", "eval.scheduler=ddim",
               "eval.steps=2", "eval.guidance_scale=1", "data.num_images=200", "checkpoint.every=2"]


def until_records(run) -> list[dict]:
    return [r for r in map(json.loads, RunDir(run).metrics.read_text().splitlines()) if "until/decided" in r]


def test_an_interrupted_plateau_run_resumes_to_the_same_stop(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(judge_mod, "MIN_STEPS", 30)
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 30)
    full = train(tiny_config(*PLATEAU_RUN), tmp_path / "full")
    decided = until_records(full.run)
    assert len(decided) == 1 and full.finished and full.step == decided[0]["until/end"] <= 12
    assert json.loads((full.run / "model" / "difftool.json").read_text())["step"] == full.step, "the step it ended at"

    assert "judge at step" in capsys.readouterr().err, "a finished run ends with the verdict"
    monkeypatch.setattr(loop_mod._Trainer, "_agree_to_stop", lambda self, s: s == 5)  # Ctrl-C in step 5
    stopped = train(tiny_config(*PLATEAU_RUN), tmp_path / "part")
    assert (stopped.step, stopped.finished) == (5, False)
    said = capsys.readouterr().err
    assert "continue with difftool train --resume" in " ".join(said.split()) and "judge at step" not in said, \
        "a stopped run is continued, not judged"
    monkeypatch.setattr(loop_mod._Trainer, "_agree_to_stop", lambda self, s: False)
    plan = plan_training(resume=str(stopped.run))
    resumed = train(plan.cfg, plan.output, resume=plan.resume)
    assert (resumed.step, until_records(resumed.run)) == (full.step, decided), "the rule's state came back"
    lr = [(r["step"], r["lr"]) for r in map(json.loads, RunDir(resumed.run).metrics.read_text().splitlines())
          if "lr" in r]
    assert lr == [(r["step"], r["lr"]) for r in map(json.loads, RunDir(full.run).metrics.read_text().splitlines())
                  if "lr" in r] and lr[-1][1] == 0.0, "the same held rate and cooldown to zero"

    at_evaluation = stopped.run / "checkpoints" / "step-000004"  # saved at a step that was also evaluated
    assert [s[0] for s in read_progress(at_evaluation)["until"]["scores"]] == [2, 4], "saved after the evaluation"


def test_the_first_line_says_which_budget_applies():
    assert Budget(4000).describe(0) == "steps 0->4000"
    assert "then on while the judge's FD improves (train.until: plateau, at most 16000)" in Plateau(
        4000, 16000, 100).describe(0)
    assert Plateau(4000, 4000, 100).describe(1000).startswith("steps 1000->4000 ("), "no evaluations: the budget"


def test_the_first_line_of_a_run_resumed_past_its_budget_says_where_it_stands():
    """Not `steps 7000->4000`: past the budget the rule is still deciding, or already cooling down."""
    assert Plateau(4000, 16000, 100).describe(7000) == (
        "from step 7000 on while the judge's FD improves (train.until: plateau, past its budget of 4000, at most 16000)")
    assert Plateau(4000, 7700, 100).describe(7000) == "steps 7000->7700 (train.until: plateau at most 7700: cooling down)"
    decided = Plateau(4000, 16000, 100, decided=10000, reason="levelled")
    assert decided.describe(10500) == "steps 10500->11000 (train.until: plateau decided at step 10000: cooling down)"
