"""What mirroring costs a judge trained without flips (evaluation/judge.py): the measure `data.random_flip: auto`
decides by, on classes that mirroring turns into each other and on classes that look alike mirrored."""

from __future__ import annotations

import pytest
import torch

from difftool.evaluation import judge as judge_mod
from difftool.evaluation.judge import has_handedness, held_out_split, train_judge
from tests.evaluation.conftest import colours


def bars(n: int = 240, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that are each other's mirror image: a bright bar at the left edge, or at the right."""
    labels = torch.arange(n) % 2
    images = torch.full((n, 3, size, size), 30, dtype=torch.uint8)
    images[labels == 0, :, :, :2] = 220
    images[labels == 1, :, :, -2:] = 220
    return images, labels


def right_answers(lost: int, gained: int, both: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, right unmirrored and right mirrored: `lost` right only unmirrored, `gained` only mirrored."""
    right = torch.tensor([True] * lost + [False] * gained + [True] * both)
    return right, torch.tensor([False] * lost + [True] * gained + [True] * both)


@pytest.mark.parametrize("lost, gained, both, handed", [
    (100, 0, 900, True),    # a tenth of the images lost to mirroring
    (30, 0, 970, False),    # 3%: below the smallest drop that counts
    (240, 180, 580, False),  # 6% net, but within three times the noise of the 420 images that changed
    (0, 100, 900, False),   # mirrored images do better: no handedness
])
def test_handedness_is_a_drop_larger_than_its_noise_and_the_smallest_that_counts(lost, gained, both, handed):
    assert has_handedness(*right_answers(lost, gained, both)) is handed


def test_classes_that_are_each_other_s_mirror_image_are_found_handed(monkeypatch):
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 100)
    images, labels = bars()
    held, rest = held_out_split(len(images), floor_images=10)
    _, report = train_judge(images, labels, ["left", "right"], held=held, train=rest, flips=False)
    assert report.accuracy == 1.0 and report.mirrored_accuracy == 0.0 and report.handed is True
    assert "100.0% right on 24 held-out images (chance 50%), 0.0% on them mirrored" in report.describe()


def test_classes_that_look_alike_mirrored_are_not(monkeypatch):
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 100)
    images, labels = colours()
    held, rest = held_out_split(len(images), floor_images=10)
    _, report = train_judge(images, labels, ["red", "green", "blue"], held=held, train=rest, flips=False)
    assert report.mirrored_accuracy == report.accuracy == 1.0 and report.handed is False


def test_a_judge_trained_with_flips_or_without_classes_does_not_measure_it(monkeypatch):
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 30)
    images, labels = bars()
    held, rest = held_out_split(len(images), floor_images=10)
    for kept, flips in ((labels, True), (None, False)):
        _, report = train_judge(images, kept, ["left", "right"] if kept is not None else None, held=held, train=rest,
                                flips=flips)
        assert report.mirrored_accuracy is None and report.handed is None
