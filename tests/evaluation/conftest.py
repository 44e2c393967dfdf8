"""Images for the evaluation tests: a folder of them, the built-in shapes as a tensor, and three colour classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()


def write_images(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def shapes(n: int, resolution: int = 8, seed_offset: int = 0) -> torch.Tensor:
    from difftool.data import make_shapes

    return make_shapes(n + seed_offset, resolution).images[seed_offset:]


def colours(n: int = 240, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes anyone can tell apart: red, green and blue squares with a little noise."""
    labels = torch.arange(n) % 3
    images = torch.full((n, 3, size, size), 30.0)
    images[torch.arange(n), labels] = 220.0
    images += torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 10
    return images.clamp(0, 255).to(torch.uint8), labels
