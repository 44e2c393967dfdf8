"""Consistency distillation in the LCM way (Song et al. 2023; Luo et al. 2023), in pixel space.

The student f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t) learns to give one clean image for every point of a
path of the teacher's probability-flow ODE. A training image is noised to a timestep t of the solver grid (the 50
timesteps LCM's sampler steps on); the teacher, guided at the baked-in scale, takes one DDIM step from there to the
grid's previous timestep s; a copy of the student that follows it slowly (the target, an EMA of decay 0.95) maps
that point; the student at t is pulled to the target's answer. At s = 0 the boundary condition (c_skip 1, c_out 0)
anchors the chain to the data. Sampled with `lcm`, whose scalings these are.
"""

from __future__ import annotations

import copy

import torch

from difftool.distilling.ddim import ddim_step
from difftool.sampling.loop import Predictor, predicted_x0_and_noise
from difftool.sampling.schedulers import CONSISTENCY_GRID
from difftool.training.objective import Objective

SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constants: the student must be sampled with the scalings it
TIMESTEP_SCALING = 10.0  # learned


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timesteps t, per image, shaped to broadcast over images."""
    scaled = t.float()[:, None, None, None] * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2).sqrt()


class ConsistencyDistillation(Objective):
    def __init__(self, cfg, accelerator, student, teacher, noise_scheduler, null_class: int | None):
        self.cfg, self.accelerator = cfg, accelerator
        device = accelerator.device
        config = noise_scheduler.config
        self.kind, self.clip = config.prediction_type, config.clip_sample and config.clip_sample_range
        self.alpha_bar = noise_scheduler.alphas_cumprod.to(device, torch.float32)
        total = config.num_train_timesteps
        self.grid = min(CONSISTENCY_GRID, total)
        self.skip = total // self.grid
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = student
        self.target = copy.deepcopy(student).eval().requires_grad_(False)
        self.null_class, self.guidance = null_class, cfg.distill.guidance_scale
        self.decay = cfg.distill.target_decay

    def loss(self, unet, x0, labels, noise, t):
        total = self.cfg.scheduler.num_train_timesteps
        t_n = (t * self.grid // total + 1) * self.skip - 1  # a grid timestep: (n + 1) k - 1, n uniform in [0, grid)
        s = (t_n - self.skip).clamp(min=0)
        a_t = self.alpha_bar[t_n][:, None, None, None]
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        output = unet(x_t, t_n, class_labels=labels).sample.float()
        prediction = self._consistency(output, x_t, t_n)
        with torch.no_grad(), self.accelerator.autocast():
            teacher = Predictor(self.teacher, class_labels=labels, null_class=self.null_class,
                                guidance_scale=self.guidance if labels is not None else 1.0)
            x_s = ddim_step(teacher(x_t, t_n).float(), x_t, a_t, self.alpha_bar[s][:, None, None, None], self.kind,
                            self.clip)
            target = self._consistency(self.target(x_s, s, class_labels=labels).sample.float(), x_s, s)
        if self.cfg.distill.loss == "l2":
            return (prediction - target).pow(2).mean()
        c = self.cfg.distill.huber_c
        return ((prediction - target).pow(2) + c * c).sqrt().sub(c).mean()

    def _consistency(self, output, x, t):
        c_skip, c_out = boundary_scalings(t)
        clean = predicted_x0_and_noise(output, x, self.alpha_bar[t][:, None, None, None], self.kind)[0]
        return c_skip * x + c_out * clean

    def after_step(self):
        target, student = list(self.target.parameters()), list(self.student.parameters())
        torch._foreach_lerp_(target, [p.detach() for p in student], 1 - self.decay)

    def saved(self):
        return [self.target]

    def describe(self):
        guided = f", guidance {self.guidance:g} baked in" if self.null_class is not None else ""
        return (f"consistency distillation of {self.cfg.distill.teacher} into a {self.cfg.sample.steps}-step student"
                f"{guided}")
