"""Inpainting on top of the sampling loop: RePaint, and known-region blending for any scheduler.

Both methods keep the known region on the forward process: before the model sees x_t, the
known pixels are the input image noised to exactly the level of x_t. diffusers' deprecated
RePaintScheduler noises them one step off (to t instead of the level it steps to); here the
level is always the one the sample is at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from difftool.sampling.loop import Predictor, denoise, initial_noise, predicted_x0_and_noise

METHODS = ("repaint", "blend")


@dataclass(frozen=True)
class RepaintSchedule:
    """RePaint's walk over the inference timesteps: down one level at a time; at every
    `jump_length`-th level counted up from the last noisy one, go back up `jump_length` levels,
    `jump_n_sample - 1` times, before going on down (250 levels, 10, 10: 2410 model calls)."""

    levels: int
    jump_length: int = 10
    jump_n_sample: int = 10

    def moves(self) -> Iterator[tuple[str, int]]:
        """("down", i): level i -> i + 1 (less noise); ("up", i): level i + 1 -> i. Level 0 is t = T-1."""
        ends = range(self.levels - 1, self.jump_length - 1, -self.jump_length)
        jumps_left = {end: self.jump_n_sample - 1 for end in ends}
        level = 0
        while level < self.levels:
            yield "down", level
            level += 1
            if jumps_left.get(level, 0) > 0 and level < self.levels:
                jumps_left[level] -= 1
                for _ in range(self.jump_length):
                    level -= 1
                    yield "up", level

    def model_calls(self) -> int:
        return sum(move == "down" for move, _ in self.moves())


@torch.inference_mode()
def repaint(predict: Predictor, scheduler, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, *,
            schedule: RepaintSchedule, generators: list[torch.Generator], on_step: Callable[[], None] | None = None
            ) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022) with DDPM posterior steps between the timesteps of `scheduler`.

    `scheduler` is the model's training DDPMScheduler (its betas, prediction type and clipping);
    `mask` is 1 where to generate. Steps may skip timesteps: the posterior is that of the skip.
    """
    device = noise.device
    scheduler.set_timesteps(schedule.levels, device=device)
    alphas = scheduler.alphas_cumprod.to(device)
    # Level i is timestep i of the schedule; the extra last level is the clean image (alpha_bar 1).
    level_alpha = torch.cat([alphas[scheduler.timesteps], torch.ones(1, device=device)])
    config = scheduler.config
    x = noise
    for move, level in schedule.moves():
        if move == "up":
            ratio = level_alpha[level] / level_alpha[level + 1]
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * initial_noise(generators, x.shape[1:], device)
            continue
        a_t, a_s = level_alpha[level], level_alpha[level + 1]
        x0 = predicted_x0_and_noise(predict(x, scheduler.timesteps[level]), x, a_t, config.prediction_type)[0]
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        unknown = _posterior_sample(x, x0, a_t, a_s, generators, last=level + 1 == schedule.levels)
        known_noisy = a_s.sqrt() * known + (1 - a_s).sqrt() * initial_noise(generators, x.shape[1:], device)
        x = mask * unknown + (1 - mask) * known_noisy
        if on_step is not None:
            on_step()
    return mask * x + (1 - mask) * known


def _posterior_sample(x: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor,
                      generators: list[torch.Generator], *, last: bool) -> torch.Tensor:
    """A draw from q(x_s | x_t, x0) for s < t (DDPM's posterior, "fixed small" variance).

    The last step lands on the clean image (alpha_bar 1), where the posterior has no noise."""
    step_alpha = a_t / a_s
    mean = (a_s.sqrt() * (1 - step_alpha) * x0 + step_alpha.sqrt() * (1 - a_s) * x) / (1 - a_t)
    variance = (1 - a_s) / (1 - a_t) * (1 - step_alpha)
    if last:
        return mean
    return mean + variance.sqrt() * initial_noise(generators, x.shape[1:], x.device)


class KnownRegion:
    """The part of an image that inpainting keeps, as `denoise` takes it: before each model call the known
    pixels become the input noised to the level of t, and `resample` rounds redo each step from its result
    noised back up (as RePaint does with jumps of 1).

    `scheduler.add_noise` does the noising in the scheduler's own frame (variance-preserving, or
    x0 + sigma * noise for Euler-type schedulers), so this works with every scheduler.
    """

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator], resample: int = 0):
        self.known, self.mask, self.generators, self.resample = known, mask, generators, resample

    def replace(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        if getattr(scheduler, "begin_index", 0) is None:
            scheduler.set_begin_index(0)  # add_noise then reads the current step, not a timestep search
        noise = initial_noise(self.generators, x.shape[1:], x.device)
        timesteps = t.reshape(1).expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t)
        noisy = scheduler.add_noise(self.known, noise, timesteps)
        return self.mask * x + (1 - self.mask) * noisy

    def paste(self, x: torch.Tensor) -> torch.Tensor:
        """The known pixels exactly, the generated ones from `x`."""
        return self.mask * x + (1 - self.mask) * self.known


def blend(predict, scheduler, region: KnownRegion, noise: torch.Tensor, *, steps: int,
          on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Sample with any scheduler, putting the noised known region back before every model call."""
    x = denoise(predict, scheduler, noise, steps=steps, generators=region.generators, on_step=on_step, known=region)
    return region.paste(x)
