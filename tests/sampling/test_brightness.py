"""Samples keep the brightness of the data they were trained on, however far it is from mid-grey.

With epsilon prediction on a cosine schedule, the first sampling step sits at an alpha_bar near
2e-9, where the model's x0 is its noise error magnified thousands of times; the sample then
keeps the mid-grey mean it started from. This tiny model came out about 65 levels off on both
sets below; the recipes' v-prediction at zero terminal SNR brings it within a few levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.sampling.job import SampleRequest, generate
from difftool.training.loop import train
from tests.conftest import tiny_config

RESOLUTION = 8


def write_folder(root: Path, level: int, count: int = 128) -> float:
    """Two classes (a filled square, a plus) in random colours on a plain, slightly tinted background of
    `level`; returns the mean pixel of the images written."""
    rng = np.random.default_rng(level)
    images = []
    for i in range(count):
        image = np.full((RESOLUTION, RESOLUTION, 3), level, float) + rng.uniform(-10, 10, 3)
        x, y = rng.integers(0, RESOLUTION - 3, 2)
        colour = rng.uniform(0, 255, 3)
        if i % 2:
            image[y : y + 3, x : x + 3] = colour
        else:
            image[y + 1, x : x + 3] = colour
            image[y : y + 3, x + 1] = colour
        pixels = image.clip(0, 255).round().astype(np.uint8)
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "ab"[i % 2] / f"{i:03d}.png")
        images.append(pixels)
    return float(np.mean(images))


@pytest.mark.parametrize("level", [30, 225], ids=["dark", "light"])
def test_samples_have_the_brightness_of_the_data(tmp_path, level):
    data_mean = write_folder(tmp_path / "data", level)
    # The quickstart recipe's noise schedule and prediction type, on the tiny UNet for 300 steps.
    cfg = tiny_config(f"data.dataset={tmp_path / 'data'}", "train.max_steps=300", "train.lr=0.003",
                      "train.batch_size=16", "checkpoint.every=1000", "sample.every=1000", "log.every=100")
    train(cfg, tmp_path / "run")
    # The run's DDIM, and folder32's stochastic DPM-Solver++ SDE, whose first step is at infinite noise here.
    for scheduler in (None, "dpm-solver-sde"):
        out = tmp_path / f"samples-{scheduler}"
        generate(tmp_path / "run", SampleRequest(num_images=32, scheduler=scheduler), out)
        samples = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))])
        assert abs(samples.mean() - data_mean) < 5, \
            f"{scheduler or 'ddim'}: samples' mean pixel {samples.mean():.1f}, the data's {data_mean:.1f}"


def test_an_epsilon_run_fine_tuned_into_v_takes_the_datas_brightness(tmp_path):
    """The remedy the README gives for runs trained before v-prediction: train.init_from the old run."""
    data_mean = write_folder(tmp_path / "data", 30)
    common = [f"data.dataset={tmp_path / 'data'}", "train.lr=0.003", "train.batch_size=16", "checkpoint.every=1000",
              "sample.every=1000", "log.every=100"]
    old = tiny_config(*common, "train.max_steps=300", "scheduler.prediction_type=epsilon",
                      "scheduler.rescale_betas_zero_snr=false")
    train(old, tmp_path / "old")
    tuned = tiny_config(*common, "train.max_steps=150", f"train.init_from={tmp_path / 'old'}")
    train(tuned, tmp_path / "tuned")
    means = {}
    for run in ("old", "tuned"):
        generate(tmp_path / run, SampleRequest(num_images=32), tmp_path / f"{run}-samples")
        means[run] = np.mean([np.asarray(Image.open(p)) for p in sorted((tmp_path / f"{run}-samples").glob("0*.png"))])
    assert means["old"] - data_mean > 20, means  # the fault the fine-tuning is to remove
    assert abs(means["tuned"] - data_mean) < 5, f"{means}, the data's {data_mean:.1f}"
