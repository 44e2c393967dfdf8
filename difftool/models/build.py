"""UNet2DModel and DDPMScheduler built from a resolved config."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from difftool.config import ModelConfig, SchedulerConfig


def build_unet(cfg: ModelConfig, *, resolution: int, channels: int, num_classes: int | None) -> UNet2DModel:
    """A DDPM-style UNet: one level per entry of block_out_channels, attention where listed.

    A class-conditional model gets one extra class embedding, the "null" class that label
    dropout trains for classifier-free guidance; its id is `num_classes`.
    """
    sizes = [resolution // 2**i for i in range(len(cfg.block_out_channels))]
    attention = [size in cfg.attention_resolutions for size in sizes]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.attention_head_dim,
        add_attention=cfg.mid_block_attention,
        dropout=cfg.dropout,
        norm_num_groups=cfg.norm_num_groups,
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
        num_class_embeds=num_classes + 1 if cfg.class_conditional and num_classes else None,
    )


def build_noise_scheduler(cfg: SchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_config_of(unet_config: dict, resolution: int, channels: int) -> tuple[ModelConfig, str | None]:
    """The ModelConfig that `build_unet` turns into this UNet, and None; or a best guess and what differs
    (a UNet built otherwise, which a run of difftool cannot rebuild from its recipe)."""
    sizes = [resolution // 2**i for i in range(len(unet_config.get("block_out_channels") or ()))]
    down = unet_config.get("down_block_types") or ()
    conditional = unet_config.get("num_class_embeds") is not None
    guess = ModelConfig(
        block_out_channels=tuple(unet_config.get("block_out_channels") or ()),
        layers_per_block=unet_config.get("layers_per_block", 2),
        attention_resolutions=tuple(size for size, kind in zip(sizes, down) if kind.startswith("Attn")),
        attention_head_dim=unet_config.get("attention_head_dim"),
        mid_block_attention=unet_config.get("add_attention", True),
        dropout=unet_config.get("dropout", 0.0),
        norm_num_groups=unet_config.get("norm_num_groups", 32),
        resnet_time_scale_shift=unet_config.get("resnet_time_scale_shift", "default"),
        class_conditional=conditional,
    )
    classes = unet_config["num_class_embeds"] - 1 if conditional else None
    with torch.device("meta"):  # the config alone: no weights are allocated
        rebuilt = build_unet(guess, resolution=resolution, channels=channels, num_classes=classes).config
    differ = sorted(k for k, v in rebuilt.items() if not k.startswith("_") and _plain(unet_config.get(k, v)) != _plain(v))
    return guess, (f"{differ[0]} is {unet_config.get(differ[0])!r}, not {rebuilt[differ[0]]!r}" if differ else None)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
