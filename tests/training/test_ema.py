"""EMA: usable early in short runs, 0.9999-style decay in long ones (cf. diffusers issue #1772)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from difftool.config import load_config
from difftool.data import load_dataset, make_batch
from difftool.training.loop import train
from tests.conftest import tiny_config


def decay_schedule(recipe: str) -> EMAModel:
    ema = load_config(recipe).ema
    return EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=ema.max_decay, use_ema_warmup=True,
                    inv_gamma=ema.inv_gamma, power=ema.power)


@pytest.mark.parametrize("recipe", ["quickstart", "mnist", "cifar10"])
def test_decay_is_short_early_and_long_late(recipe):
    ema = decay_schedule(recipe)
    # An average over ~1/(1-decay) steps: after 300 steps it must remember well under 300 steps,
    # i.e. EMA samples follow the model within a short run.
    remembered_steps = 1 / (1 - ema.get_decay(300))
    assert remembered_steps < 100
    assert ema.get_decay(1_000) < 0.995
    assert ema.get_decay(10_000_000) == pytest.approx(ema.decay)


def test_cifar10_reaches_the_ddpm_papers_decay():
    ema = decay_schedule("cifar10")
    assert ema.decay == 0.9999
    assert ema.get_decay(300_000) == pytest.approx(0.9999)  # long before the 800k steps end


def denoising_loss(unet: UNet2DModel, cfg) -> float:
    """Mean epsilon-prediction error on a fixed batch and fixed noise levels."""
    data = load_dataset(cfg.data)
    g = torch.Generator().manual_seed(0)
    x0, labels = make_batch(data, torch.arange(32), resolution=cfg.data.resolution, random_flip=False, crop="center")
    scheduler = DDPMScheduler(num_train_timesteps=cfg.scheduler.num_train_timesteps,
                              beta_schedule=cfg.scheduler.beta_schedule)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(0, cfg.scheduler.num_train_timesteps - 1, 32).long()
    with torch.no_grad():
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_ema_weights_are_usable_after_a_short_run(tmp_path):
    cfg = tiny_config("train.max_steps=60", "checkpoint.every=60", "sample.every=60", "log.every=20",
                      "train.lr=0.003", "ema.max_decay=0.9999")
    run = train(cfg, tmp_path / "r").run
    ema = UNet2DModel.from_pretrained(run / "model" / "unet")
    raw = UNet2DModel.from_pretrained(run / "model" / "unet_raw")
    torch.manual_seed(cfg.train.seed)
    untrained = UNet2DModel.from_config(raw.config)
    start, trained, averaged = (denoising_loss(m, cfg) for m in (untrained, raw, ema))
    assert trained < 0.7 * start, "the raw model must have learned something in 60 steps"
    # The EMA model must have followed: nearly as good as the raw one, far from the start.
    assert averaged < 0.75 * start
    assert averaged < trained * 1.25
