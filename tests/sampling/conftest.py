"""What the sampling tests share: a model made without difftool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


@pytest.fixture(scope="module")
def unconditional_model(tmp_path_factory) -> Path:
    """A diffusers pipeline folder made without difftool: no class labels, no difftool.json."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False)
    path = tmp_path_factory.mktemp("uncond") / "pipe"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40)).save_pretrained(path)
    return path
