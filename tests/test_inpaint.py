"""Inpainting: the RePaint walk, both methods on an analytic model, noise levels of the known region, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from typer.testing import CliRunner

from difftool.cli.app import app
from difftool.inpaint import RepaintSchedule, blend, repaint
from difftool.sample import Predictor, image_generators, initial_noise
from difftool.schedulers import SCHEDULERS, make_scheduler
from tests.conftest import assert_user_error

T, SHAPE = 50, (3, 16, 16)
runner = CliRunner()


def training_config(**overrides) -> dict:
    settings = {"num_train_timesteps": T, "beta_start": 1e-6, "beta_end": 0.2, "clip_sample": True, **overrides}
    return dict(DDPMScheduler(**settings).config)


class KnowsTheAnswer:
    """Predicts the noise that turns any x_t into `answer`; records the inputs it sees."""

    dtype = torch.float32

    def __init__(self, answer: torch.Tensor):
        self.alphas_cumprod = DDPMScheduler.from_config(training_config()).alphas_cumprod
        self.answer, self.calls = answer, []

    def __call__(self, x_t, t, **kwargs):
        alpha_bar = self.alphas_cumprod[round(float(t))]
        self.calls.append((x_t.clone(), alpha_bar))
        eps = (x_t - alpha_bar.sqrt() * self.answer) / (1 - alpha_bar).sqrt()
        return type("Output", (), {"sample": eps})


def answer() -> torch.Tensor:
    return 0.9 * torch.linspace(-1, 1, int(np.prod(SHAPE))).reshape(SHAPE)


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, *SHAPE[1:])
    mask[..., 4:12, 4:12] = 1
    return mask


def known_image() -> torch.Tensor:
    return -0.5 * torch.ones(2, *SHAPE)  # differs from the answer everywhere


# ---------------------------------------------------------------- the RePaint walk


def test_repaint_schedule_matches_the_paper_count():
    assert RepaintSchedule(250, 10, 10).model_calls() == 250 + 24 * 9 * 10


@pytest.mark.parametrize(("levels", "length", "n"), [(20, 5, 3), (10, 1, 4), (7, 10, 10), (12, 3, 1)])
def test_repaint_schedule_walks_down_to_the_clean_image(levels, length, n):
    moves = list(RepaintSchedule(levels, length, n).moves())
    level = 0
    for move, at in moves:
        assert at == (level if move == "down" else level - 1)
        level += 1 if move == "down" else -1
        assert 0 <= level <= levels
    assert level == levels and moves[-1] == ("down", levels - 1)
    ups = sum(move == "up" for move, _ in moves)
    assert ups == (n - 1) * length * len(range(levels - 1, length - 1, -length))


# ---------------------------------------------------------------- both methods, analytic model


def test_repaint_fills_with_the_answer_and_keeps_the_known_region():
    model = KnowsTheAnswer(answer())
    generators = image_generators(0, [0, 1])
    noise = initial_noise(generators, SHAPE, "cpu")
    out = repaint(Predictor(model), DDPMScheduler.from_config(training_config()), known_image(), centre_mask(), noise,
                  schedule=RepaintSchedule(10, 2, 3), generators=generators)
    inside = centre_mask().bool().expand_as(out)
    torch.testing.assert_close(out[inside], answer().expand_as(out)[inside], atol=1e-4, rtol=0)
    assert torch.equal(out[~inside], known_image()[~inside])


@pytest.mark.parametrize("spec", SCHEDULERS, ids=lambda spec: spec.name)
def test_blend_fills_with_the_answer_with_every_scheduler(spec):
    model = KnowsTheAnswer(answer())
    generators = image_generators(0, [0, 1])
    noise = initial_noise(generators, SHAPE, "cpu")
    out = blend({}, model, make_scheduler(spec.name, training_config(), steps=10), known_image(), centre_mask(), noise,
                steps=10, generators=generators)
    inside = centre_mask().bool().expand_as(out)
    torch.testing.assert_close(out[inside], answer().expand_as(out)[inside], atol=5e-3, rtol=0)
    assert torch.equal(out[~inside], known_image()[~inside])


def implied_noise_std(calls, known: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Std of (x_t - sqrt(ab) x0) / sqrt(1 - ab) over the known region of each model input: 1 if noised to t."""
    keep = (1 - mask).bool().expand_as(known)
    return [float(((x - ab.sqrt() * known) / (1 - ab).sqrt())[keep].std()) for x, ab in calls]


def test_repaint_noises_the_known_region_to_the_level_of_each_model_call():
    """The off-by-one of diffusers' RePaintScheduler would show here as a wrong noise level."""
    model = KnowsTheAnswer(answer())
    known = known_image().repeat(4, 1, 1, 1)
    generators = image_generators(0, range(8))
    repaint(Predictor(model), DDPMScheduler.from_config(training_config()), known, centre_mask(),
            initial_noise(generators, SHAPE, "cpu"), schedule=RepaintSchedule(10, 2, 2), generators=generators)
    stds = implied_noise_std(model.calls[1:], known, centre_mask())  # the first input is pure noise by design
    assert min(stds) > 0.9 and max(stds) < 1.1, stds


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm-solver", "heun"])
def test_blend_noises_the_known_region_to_the_level_of_each_model_call(name):
    model = KnowsTheAnswer(answer())
    known = known_image().repeat(4, 1, 1, 1)
    generators = image_generators(0, range(8))
    scheduler = make_scheduler(name, training_config(), steps=10)
    blend({}, model, scheduler, known, centre_mask(), initial_noise(generators, SHAPE, "cpu"), steps=10,
          generators=generators)
    stds = implied_noise_std(model.calls, known, centre_mask())
    assert min(stds) > 0.9 and max(stds) < 1.1, stds


def test_each_sample_depends_only_on_seed_and_index():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False).eval()

    def fill(indices):
        generators = image_generators(5, indices)
        noise = initial_noise(generators, SHAPE, "cpu")
        known = known_image()[:1].expand(len(indices), -1, -1, -1)
        return repaint(Predictor(unet), DDPMScheduler.from_config(training_config()), known, centre_mask(), noise,
                       schedule=RepaintSchedule(6, 2, 2), generators=generators)

    batch = fill([0, 1, 2])
    torch.testing.assert_close(batch[2], fill([2])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])
