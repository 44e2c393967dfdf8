"""`data.random_flip: auto` (training/judging.py flips_of): the run's judge decides, before the first step,
whether random flips would teach the model images unlike the data; the run then trains exactly as with the
value it chose, and a resumed run chooses the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftool.evaluation import judge as judge_mod
from difftool.rundir import RunDir
from difftool.training.loop import train
from tests.conftest import tiny_config
from tests.training.conftest import assert_same_weights, interrupt_at, model_weights

JUDGED = ["eval.every=4", "eval.num_samples=8", "eval.features=judge", "eval.reference=data", "eval.scheduler=ddim",
          "eval.steps=2", "eval.guidance_scale=1", "train.max_steps=4"]


@pytest.fixture(autouse=True)
def quick_judge(monkeypatch):
    monkeypatch.setattr(judge_mod, "MIN_STEPS", 100)
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 100)


def bars_folder(root: Path, per_class: int = 120) -> Path:
    """Class folders `left` and `right`: a bright bar at that edge of an 8-px image, each the other's mirror."""
    for name, columns in (("left", slice(0, 2)), ("right", slice(6, 8))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.full((8, 8, 3), 30 + i % 20, dtype=torch.uint8)
            pixels[:, columns] = 220
            Image.fromarray(pixels.numpy()).save(root / name / f"{i:03d}.png")
    return root


def printed(capsys) -> str:
    """What the run said, its lines wrapped by the console joined again."""
    return " ".join(capsys.readouterr().err.split())


def decision(run: Path) -> bool | None:
    return json.loads((RunDir(run).eval_dir / "judge.json").read_text())["report"]["handed"]


def test_classes_that_mirror_into_each_other_train_without_flips_and_resume_the_same(tmp_path, capsys, monkeypatch):
    settings = [*JUDGED[:-1], "train.max_steps=6", "data.dataset=" + str(bars_folder(tmp_path / "bars")),
                "data.resolution=8"]
    interrupt_at(monkeypatch, 3)  # Ctrl-C: a checkpoint at step 3, then --resume
    auto = train(tiny_config(*settings, "data.random_flip=auto"), tmp_path / "auto")
    assert decision(auto.run) is True and not auto.finished
    assert "data.random_flip auto: off: the judge is 100% right on held-out images and 0% on them mirrored" \
        in printed(capsys)
    monkeypatch.undo()
    train(tiny_config(*settings, "data.random_flip=auto"), auto.run, resume=RunDir(auto.run).latest_checkpoint())
    assert "data.random_flip auto: off" in printed(capsys)
    plain = train(tiny_config(*settings, "data.random_flip=false"), tmp_path / "off")
    assert_same_weights(model_weights(auto.run), model_weights(plain.run))


def test_classes_that_look_alike_mirrored_keep_flips(tmp_path, capsys):
    auto = train(tiny_config(*JUDGED, "data.num_images=200", "data.random_flip=auto"), tmp_path / "auto")
    assert decision(auto.run) is False
    assert "data.random_flip auto: on: the judge is" in printed(capsys)
    plain = train(tiny_config(*JUDGED, "data.num_images=200", "data.random_flip=true"), tmp_path / "on")
    assert_same_weights(model_weights(auto.run), model_weights(plain.run))


def test_without_a_judge_auto_keeps_flips_and_says_why(tmp_path, capsys):
    auto = train(tiny_config("data.random_flip=auto"), tmp_path / "auto")
    assert "data.random_flip auto: on: no classifier of the data measured" in printed(capsys)
    plain = train(tiny_config("data.random_flip=true"), tmp_path / "on")
    assert_same_weights(model_weights(auto.run), model_weights(plain.run))


def test_a_value_that_is_not_a_choice_is_refused():
    from difftool.errors import UserError

    with pytest.raises(UserError, match="data.random_flip must be true, false or auto, got 'sometimes'"):
        tiny_config("data.random_flip=sometimes")
