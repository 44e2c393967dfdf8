"""Progressive distillation (Salimans & Ho 2022), in pixel space, in rounds within one run.

Each round halves the steps: the student learns to go in one DDIM step where its teacher takes two, and the next
round's teacher is the student as the round ends. The first round's teacher is the model being distilled, guided at
the baked-in scale, taking 2^rounds times the final steps. The student's step from t to s lands on the teacher's
two-step result z_s when the student's clean image is x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s /
sigma_t) alpha_t); the loss is that image's error weighted by max(SNR, 1) (the v-prediction loss, truncated SNR).
Sampled with deterministic DDIM on its trailing timesteps, the grid trained on.
"""

from __future__ import annotations

import copy

import torch

from difftool.distilling.ddim import ddim_step
from difftool.sampling.loop import Predictor, predicted_x0_and_noise
from difftool.training.objective import Objective


def ddim_grid(total: int, steps: int) -> list[int]:
    """DDIMScheduler's timesteps for `steps` steps with trailing spacing (from T-1 down)."""
    ratio = total / steps
    return [round(total - i * ratio) - 1 for i in range(steps)]


class _RoundTeacher(torch.nn.Module):
    """The teacher of the rounds after the first (the student as the last round ended), and which round it is for:
    saved in every checkpoint, so a resumed run learns from the same teacher."""

    def __init__(self, student):
        super().__init__()
        self.unet = copy.deepcopy(student).eval().requires_grad_(False)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))


class ProgressiveDistillation(Objective):
    def __init__(self, cfg, accelerator, student, teacher, noise_scheduler, null_class: int | None):
        self.cfg, self.accelerator, self.student = cfg, accelerator, student
        device = accelerator.device
        config = noise_scheduler.config
        self.kind, self.clip = config.prediction_type, config.clip_sample and config.clip_sample_range
        self.teacher_kind = cfg.distill.teacher_prediction or self.kind
        # alpha_bar of every timestep, and 1 (the clean image) at index -1: DDIM's last step lands there
        self.alpha_bar = torch.cat([noise_scheduler.alphas_cumprod.to(torch.float32), torch.ones(1)]).to(device)
        self.total = config.num_train_timesteps
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.later = _RoundTeacher(student).to(device)
        self.null_class, self.guidance = null_class, cfg.distill.guidance_scale
        self.rounds, self.final = cfg.distill.rounds, cfg.sample.steps
        self.per_round = cfg.distill.round_steps or max(1, cfg.train.max_steps // self.rounds)
        self.round = 0

    def begin_step(self, step):
        self.round = min(step // self.per_round, self.rounds - 1)
        if self.round > int(self.later.round):  # the first step of a round: the student so far teaches it
            self.later.unet.load_state_dict(self.student.state_dict())
            self.later.round.fill_(self.round)

    def loss(self, unet, x0, labels, noise, t):
        steps = self.final * 2 ** (self.rounds - 1 - self.round)  # the student's steps in this round
        grid = torch.tensor(ddim_grid(self.total, steps), device=t.device)
        t_i = grid[t * steps // self.total]
        s = t_i - self.total // steps  # DDIMScheduler's previous timestep; -1 and below: the clean image
        m = t_i - (self.total // steps) // 2
        a_t = self._alpha(t_i)
        z_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        clean = predicted_x0_and_noise(unet(z_t, t_i, class_labels=labels).sample.float(), z_t, a_t, self.kind)[0]
        with torch.no_grad(), self.accelerator.autocast():
            z_s = self._ddim(self._ddim(z_t, t_i, m, labels), m, s, labels)
            a_s = self._alpha(s)
            ratio = ((1 - a_s) / (1 - a_t)).sqrt()
            target = (z_s - ratio * z_t) / (a_s.sqrt() - ratio * a_t.sqrt())
        weight = (a_t / (1 - a_t)).clamp(min=1.0)  # max(SNR, 1)
        return (weight * (clean - target).pow(2)).mean()

    def _alpha(self, t):
        return self.alpha_bar[t.clamp(min=-1)][:, None, None, None]

    def _ddim(self, z, t, s, labels):
        """One deterministic DDIM step of this round's teacher from t to s (guided in the first round)."""
        first = self.round == 0
        teacher = Predictor(self.teacher if first else self.later.unet, class_labels=labels, null_class=self.null_class,
                            guidance_scale=self.guidance if first and labels is not None else 1.0)
        return ddim_step(teacher(z, t).float(), z, self._alpha(t), self._alpha(s),
                         self.teacher_kind if first else self.kind, self.clip)

    def saved(self):
        return [self.later]

    def describe(self):
        guided = f", guidance {self.guidance:g} baked in" if self.null_class is not None else ""
        first = self.final * 2**self.rounds
        return (f"progressive distillation of {self.cfg.distill.teacher}: {first} DDIM steps of the teacher to "
                f"{self.final} in {self.rounds} halving rounds{guided}")
