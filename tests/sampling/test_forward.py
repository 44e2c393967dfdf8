"""`difftool noise` (sampling/forward.py): the forward process on the user's image with the model's own schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from difftool.config import DataConfig
from difftool.data import center_crops, load_dataset
from difftool.data.decode import training_view
from difftool.models.load import load_model
from difftool.sampling.forward import noised, pick_timesteps
from tests.conftest import assert_user_error, invoke

pytestmark = pytest.mark.usefixtures("scratch_cwd")


@pytest.fixture
def photo(tmp_path) -> Path:
    """A 30×20 colour image with structure (gradients), so a crop or resize mistake shows."""
    y, x = np.mgrid[0:20, 0:30]
    array = np.stack([x * 8, y * 12, (x + y) * 5], axis=-1).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    return path


def test_the_image_is_seen_as_training_sees_it(photo, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.open(photo).save(folder / "one.png")
    data = load_dataset(dataclasses.replace(DataConfig(), dataset=str(folder), resolution=8))
    assert torch.equal(training_view(photo, 8, 3), center_crops(data, 8)[0])
    gray = training_view(photo, 8, 1)
    assert gray.shape == (1, 8, 8)


def test_x_t_follows_the_training_schedule(tiny_run, photo):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with the run's own betas, one noise draw for every column."""
    model = load_model(tiny_run)
    view = training_view(photo, 8, 3)
    chosen = [0, 10, 49]
    frames, alpha_bars = noised(view, model.scheduler_config, chosen, seed=3)
    schedule = DDPMScheduler.from_config(model.scheduler_config)
    eps = torch.randn(view.shape, generator=torch.Generator().manual_seed(3))
    for frame, t, ab in zip(frames, chosen, alpha_bars, strict=True):
        assert ab == pytest.approx(float(schedule.alphas_cumprod[t]))
        expected = ab**0.5 * (view.float() / 127.5 - 1) + (1 - ab) ** 0.5 * eps
        expected = ((expected.clamp(-1, 1) + 1) * 127.5).round()
        assert (frame.float() - expected).abs().max() <= 1
    assert alpha_bars[0] > 0.99 and alpha_bars[-1] < 0.01  # from the image to (all but) pure noise


def test_pick_timesteps():
    assert pick_timesteps(None, 6, 1000) == [0, 200, 400, 599, 799, 999]
    assert pick_timesteps("0, 5,49", 6, 50) == [0, 5, 49]


def test_the_command_writes_a_captioned_strip_with_its_settings(tiny_run, photo):
    result = invoke("noise", photo, "--model", tiny_run, "--points", "4")
    assert result.exit_code == 0, result.output
    strip = Image.open("photo-noise.png")
    assert strip.text["timesteps"] == "0,16,33,49" and len(strip.text["alpha_bars"].split(",")) == 4
    assert strip.width > 4 * 64 > strip.height  # four tiles enlarged from 8 px to 64, in one row
    again = invoke("noise", photo, "--model", tiny_run, "--timesteps", "0,49", "--output", "photo-noise.png")
    assert_user_error(again, "exists", "--overwrite")
    assert invoke("noise", photo, "--model", tiny_run, "--timesteps", "0,49", "-o", "photo-noise.png",
                  "--overwrite").exit_code == 0
    assert Image.open("photo-noise.png").text["timesteps"] == "0,49"


@pytest.mark.parametrize(("args", "fragments"), [
    (["--timesteps", "0,50"], ("--timesteps", "0..49", "got 50")),
    (["--timesteps", "a,b"], ("--timesteps", "whole numbers")),
    (["--points", "1"], ("--points", "at least 2")),
])
def test_bad_timesteps_are_one_line(tiny_run, photo, args, fragments):
    assert_user_error(invoke("noise", photo, "--model", tiny_run, *args), *fragments)


def test_bad_images_and_outputs_are_one_line(tiny_run, photo, tmp_path):
    assert_user_error(invoke("noise", tmp_path, "--model", tiny_run), "is a folder")
    assert_user_error(invoke("noise", tmp_path / "missing.png", "--model", tiny_run), "does not exist")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_user_error(invoke("noise", tmp_path / "broken.png", "--model", tiny_run), "cannot read image")
    assert_user_error(invoke("noise", photo, "--model", tiny_run, "-o", photo), "the image")
    assert_user_error(invoke("noise", photo, "--model", tiny_run, "-o", tmp_path), "is a folder")
    assert photo.stat().st_size > 0
