"""What an importer of another toolkit's checkpoint hands back: a UNet2DModel and its noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Imported:
    unet_config: dict  # UNet2DModel init arguments
    state: dict[str, torch.Tensor]  # UNet2DModel state dict, loads with strict=True
    scheduler_config: dict  # DDPMScheduler init arguments (betas, T, prediction type, clipping)
    notes: list[str] = field(default_factory=list)  # what was assumed, to print once
