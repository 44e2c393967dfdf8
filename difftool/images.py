"""Image files: grids and PNGs with their settings in text metadata, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from difftool.rundir import atomic_path


def make_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 N×C×H×W -> one C×H'×W' image, white padding between tiles."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor, so small samples can be looked at."""
    return image.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) if factor > 1 else image


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 C×H×W (C = 1 or 3) -> PIL image."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")


def save_png(image: torch.Tensor | Image.Image, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a PNG atomically; `metadata` goes into tEXt chunks (readable with PIL's `.text`)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    with atomic_path(Path(path)) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)
