"""A re-implementation of pytorch_diffusion's `Model` (the ddpm-original checkpoints' network), for the importers' tests.

`ReferenceModel` follows pesser/pytorch_diffusion's model.py (itself checked against Ho et al.'s
TensorFlow code) with the same parameter names, so its state dict has the release's keys; a UNet2DModel
converted from it must give the same outputs for random weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SMALL = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,), "resolution": 16}

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(b, c, height * width) for conv in (self.q, self.k, self.v))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=2)  # query i attends to key j
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ReferenceModel(nn.Module):
    """pytorch_diffusion's `Model` with resamp_with_conv=True, in_channels = out_ch = 3."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution):
        super().__init__()
        self.ch, self.levels, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        widths = [ch * m for m in ch_mult]
        skips, res, block_in = [ch], resolution, ch  # skips: channels of each saved activation
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, width, temb_ch))
                block_in = width
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(width))
                skips.append(width)
            if level != self.levels - 1:
                down.downsample = Downsample(width)
                skips.append(width)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch)
        ups = {}
        for level in reversed(range(self.levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in + skips.pop(), widths[level], temb_ch))
                block_in = widths[level]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups[level] = up
        self.up = nn.ModuleList(ups[level] for level in range(self.levels))  # indexed by level, as in the release
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                hs.append(down.attn[i](h) if len(down.attn) else h)
            if level != self.levels - 1:
                hs.append(down.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(range(self.levels)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                h = up.attn[i](h) if len(up.attn) else h
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def reference(arguments: dict, seed: int = 0) -> ReferenceModel:
    """Every parameter random (N(0, 0.05^2), GroupNorm scales around 1), so no layer is silent or an identity.

    Scales near 1 keep every residual branch loud: with scales near 0 a swapped q and k would
    change the output by less than the tolerance.
    """
    model = ReferenceModel(**arguments).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(base + torch.randn(param.shape, generator=generator) * 0.05)
    return model
