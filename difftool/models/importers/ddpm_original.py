"""The original DDPM release (Ho et al. 2020) as ported to PyTorch by pesser/pytorch_diffusion.

Its files (`diffusion_cifar10_model/model-790000.ckpt`, `ema_diffusion_lsun_church_model/...`) are
plain state dicts of pytorch_diffusion's `Model`, which is UNet2DModel layer for layer: this is how
google/ddpm-cifar10-32 was made. Only names and the 1x1-conv attention projections change.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from difftool.errors import UserError
from difftool.models.importers.base import Imported

NAME = "ddpm-original"
SIGNATURE_KEYS = ("temb.dense.0.weight", "conv_in.weight", "mid.attn_1.q.weight")
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2"}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTENTION_PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
ATTENTION_PIXELS = 16  # every released model (CIFAR-10 32 px, LSUN 256 px, DDIM's CelebA 64 px) attends at 16x16
DEFAULT_RESOLUTION = 32
SHOWN_KEYS = 5


@dataclass(frozen=True)
class Architecture:
    """pytorch_diffusion's `Model` arguments, as far as the weights tell them."""

    ch: int
    block_out_channels: tuple[int, ...]  # ch * ch_mult
    num_res_blocks: int
    attention_levels: frozenset[int]  # levels whose resolution is in attn_resolutions
    in_channels: int
    out_channels: int


def detect(state: dict) -> bool:
    """True for a pytorch_diffusion `Model` state dict, bare or under "state_dict"."""
    state = _unwrap(state)
    return state is not None and all(key in state for key in SIGNATURE_KEYS)


def convert(checkpoint: dict, *, weights: str | None = None, resolution: int | None = None) -> Imported:
    """The UNet2DModel config and state dict of one checkpoint, with the DDPM paper's schedule."""
    if weights is not None:
        raise UserError(f"a {NAME} checkpoint holds one set of weights, so --weights {weights} does not apply: the EMA "
                        f"weights of the release are a separate file (ema_diffusion_*_model/...); convert that file")
    state = _unwrap(checkpoint)
    if state is None:
        raise UserError(f"a {NAME} checkpoint is a state dict; this file holds a {type(checkpoint).__name__}")
    arch = infer_architecture(state)
    pairs = dict(key_pairs(arch))
    _check_keys(state, pairs, arch)
    notes = []
    if resolution is None:
        resolution = _guess_resolution(arch)
        notes.append(f"resolution {resolution} px assumed: the weights do not record it ({_resolution_reason(arch)}); "
                     f"pass the model's real resolution if it differs")
    converted = {new: _to_diffusers(new, state[old]) for old, new in pairs.items()}
    return Imported(unet_config(arch, resolution), converted, scheduler_config(), notes)


def infer_architecture(state: dict[str, torch.Tensor]) -> Architecture:
    """Channels from the conv shapes, depth from the block indices, attention from which levels have any."""
    ch, in_channels = _tensor(state, "conv_in.weight").shape[:2]
    levels = 1 + max((int(m[1]) for key in state if (m := re.match(r"down\.(\d+)\.", key))), default=-1)
    if levels == 0:
        raise UserError(f"this {NAME} checkpoint has no down.* keys: it is not a pytorch_diffusion Model state dict")
    block_out = tuple(_tensor(state, f"down.{level}.block.0.conv1.weight").shape[0] for level in range(levels))
    if block_out[0] != ch:
        raise UserError(f"this {NAME} checkpoint's first level has {block_out[0]} channels and conv_in {ch} "
                        f"(ch_mult[0] != 1): UNet2DModel cannot hold it, its first level is as wide as conv_in")
    num_res_blocks = len({m[1] for key in state if (m := re.match(r"down\.0\.block\.(\d+)\.", key))})
    attention_levels = frozenset(int(m[1]) for key in state if (m := re.match(r"down\.(\d+)\.attn\.", key)))
    out_channels = _tensor(state, "conv_out.weight").shape[0]
    return Architecture(ch, block_out, num_res_blocks, attention_levels, in_channels, out_channels)


def key_pairs(arch: Architecture) -> Iterator[tuple[str, str]]:
    """(pytorch_diffusion key, UNet2DModel key) for every parameter `Model` has with these arguments."""
    yield from _layer("temb.dense.0", "time_embedding.linear_1")
    yield from _layer("temb.dense.1", "time_embedding.linear_2")
    yield from _layer("conv_in", "conv_in")
    levels = len(arch.block_out_channels)
    channels = arch.ch
    for level, out in enumerate(arch.block_out_channels):
        for i in range(arch.num_res_blocks):
            yield from _resnet(f"down.{level}.block.{i}", f"down_blocks.{level}.resnets.{i}", channels != out)
            channels = out
            if level in arch.attention_levels:
                yield from _attention(f"down.{level}.attn.{i}", f"down_blocks.{level}.attentions.{i}")
        if level != levels - 1:
            yield from _layer(f"down.{level}.downsample.conv", f"down_blocks.{level}.downsamplers.0.conv")
    yield from _resnet("mid.block_1", "mid_block.resnets.0", False)
    yield from _attention("mid.attn_1", "mid_block.attentions.0")
    yield from _resnet("mid.block_2", "mid_block.resnets.1", False)
    for level in reversed(range(levels)):  # `Model.up` is indexed by level, UNet2DModel.up_blocks by order of use
        block = levels - 1 - level
        out = arch.block_out_channels[level]
        for i in range(arch.num_res_blocks + 1):
            skip = out if i < arch.num_res_blocks else (arch.block_out_channels[level - 1] if level else arch.ch)
            yield from _resnet(f"up.{level}.block.{i}", f"up_blocks.{block}.resnets.{i}", channels + skip != out)
            channels = out
            if level in arch.attention_levels:
                yield from _attention(f"up.{level}.attn.{i}", f"up_blocks.{block}.attentions.{i}")
        if level != 0:
            yield from _layer(f"up.{level}.upsample.conv", f"up_blocks.{block}.upsamplers.0.conv")
    yield from _layer("norm_out", "conv_norm_out")
    yield from _layer("conv_out", "conv_out")


def unet_config(arch: Architecture, resolution: int) -> dict:
    """UNet2DModel arguments that reproduce `Model` exactly (the google/ddpm-cifar10-32 settings)."""
    attends = [level in arch.attention_levels for level in range(len(arch.block_out_channels))]
    return {
        "sample_size": resolution,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "block_out_channels": list(arch.block_out_channels),
        "layers_per_block": arch.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "attention_head_dim": None,  # one head as wide as the block, softmax scaled by 1/sqrt(channels)
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "flip_sin_to_cos": False,  # sin before cos, frequencies exp(-log(10000) * i / (half - 1))
        "freq_shift": 1,
        "downsample_padding": 0,  # pad right and bottom by one, then a stride-2 conv
        "time_embedding_type": "positional",
        "act_fn": "silu",
    }


def scheduler_config() -> dict:
    """The paper's schedule: 1000 linear betas from 1e-4 to 0.02, epsilon prediction, x0 clipped to [-1, 1].

    Variance fixed_small as for the LSUN models; the release sampled CIFAR-10 with fixed_large (so does
    google/ddpm-cifar10-32), which the paper found about as good.
    """
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def _unwrap(checkpoint) -> dict | None:
    """The state dict, bare or under "state_dict"; None for anything else `torch.load` may return."""
    if not isinstance(checkpoint, dict):
        return None
    inner = checkpoint.get("state_dict")
    return inner if isinstance(inner, dict) else checkpoint


def _tensor(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"this {NAME} checkpoint lacks {key}: it is not a complete pytorch_diffusion Model state dict")
    return state[key]


def _check_keys(state: dict, pairs: dict[str, str], arch: Architecture) -> None:
    unknown = [key for key in state if key not in pairs]
    missing = [key for key in pairs if key not in state]
    if unknown or missing:
        problems = [f"{len(keys)} keys {what} (first: {', '.join(keys[:SHOWN_KEYS])})"
                    for keys, what in ((unknown, "this importer does not know"), (missing, "missing")) if keys]
        raise UserError(f"not a {NAME} state dict as its shapes suggest (ch {arch.ch}, channels "
                        f"{list(arch.block_out_channels)}, {arch.num_res_blocks} res blocks): {'; '.join(problems)}; "
                        f"force another format with --from if it is one")


def _guess_resolution(arch: Architecture) -> int:
    if not arch.attention_levels:
        return DEFAULT_RESOLUTION
    return ATTENTION_PIXELS * 2 ** min(arch.attention_levels)


def _resolution_reason(arch: Architecture) -> str:
    if not arch.attention_levels:
        return "no level has attention to guess from"
    return f"the released models attend at {ATTENTION_PIXELS} px, here at level {min(arch.attention_levels)}"


def _to_diffusers(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Attention projections were 1x1 convs; UNet2DModel's are linear layers of the same matrix."""
    return tensor.flatten(1) if key.endswith(ATTENTION_PROJECTIONS) else tensor


def _layer(old: str, new: str) -> Iterator[tuple[str, str]]:
    yield f"{old}.weight", f"{new}.weight"
    yield f"{old}.bias", f"{new}.bias"


def _resnet(old: str, new: str, has_shortcut: bool) -> Iterator[tuple[str, str]]:
    for part, renamed in RESNET_PARTS.items():
        yield from _layer(f"{old}.{part}", f"{new}.{renamed}")
    if has_shortcut:  # a 1x1 conv where the channel count changes
        yield from _layer(f"{old}.nin_shortcut", f"{new}.conv_shortcut")


def _attention(old: str, new: str) -> Iterator[tuple[str, str]]:
    for part, renamed in ATTENTION_PARTS.items():
        yield from _layer(f"{old}.{part}", f"{new}.{renamed}")
