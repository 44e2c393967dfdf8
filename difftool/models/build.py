"""UNet2DModel and DDPMScheduler built from a resolved config."""

from __future__ import annotations

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
