"""The teacher's solver step both distillation methods take: deterministic DDIM from t to s."""

from __future__ import annotations

import torch

from difftool.sampling.loop import predicted_x0_and_noise


def ddim_step(output: torch.Tensor, z: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor, kind: str,
              clip: float | bool) -> torch.Tensor:
    """z at alpha_bar a_s on the path the model `output` at z (alpha_bar a_t) points along. With `clip` (the
    schedule's clip_sample range), as DDIM samples: the clean image clamped, the noise re-derived from it."""
    clean, noise = predicted_x0_and_noise(output, z, a_t, kind)
    if clip:
        clean = clean.clamp(-clip, clip)
        noise = (z - a_t.sqrt() * clean) / (1 - a_t).sqrt()
    return a_s.sqrt() * clean + (1 - a_s).sqrt() * noise
