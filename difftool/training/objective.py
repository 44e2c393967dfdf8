"""What a training step minimises. The loop, checkpoints and outputs are the same whatever the objective: training
a diffusion model from data (`Denoising`) or distilling one into a few-step student (difftool/distilling)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


class Objective:
    """The loss of one micro-batch, and whatever the objective keeps beside the trained model."""

    def loss(self, unet, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Called before each optimizer step (a progressive distillation changes teacher between rounds here)."""

    def after_step(self) -> None:
        """Called after each optimizer step (a distillation's target network follows the student here)."""

    def saved(self) -> list:
        """Objects with state_dict/load_state_dict that every checkpoint holds, in a fixed order."""
        return []

    def describe(self) -> str | None:
        """What the run's first line says about the objective, where it is not plain training."""
        return None


class Denoising(Objective):
    """The diffusion loss: the model predicts the noise, the clean image or v from a noised image (per the
    schedule's prediction type), weighted per train.min_snr_gamma or train.epsilon_weighting."""

    def __init__(self, cfg, noise_scheduler):
        self.cfg, self.noise_scheduler = cfg, noise_scheduler

    def loss(self, unet, x0, labels, noise, t):
        cfg, schedule = self.cfg, self.noise_scheduler
        noisy = schedule.add_noise(x0, noise, t)
        pred = unet(noisy, t, class_labels=labels).sample
        kind = cfg.scheduler.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else schedule.get_velocity(x0, noise, t)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.train.min_snr_gamma:
            snr = compute_snr(schedule, t)
            clipped = snr.clamp(max=cfg.train.min_snr_gamma)
            weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
            per_image = per_image * weight
        elif cfg.train.epsilon_weighting:
            # The epsilon error is sqrt(alpha_bar) times the v error: this weight is the epsilon loss, floored.
            alpha_bar = schedule.alphas_cumprod.to(t.device)[t].float()
            per_image = per_image * alpha_bar.clamp(min=cfg.train.epsilon_weighting)
        return per_image.mean()


# (accelerator, the bare UNet being trained, the training noise schedule) -> the objective of a run
MakeObjective = Callable[..., Objective]
