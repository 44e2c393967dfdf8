"""Images for the evaluation tests: a folder of them, and the built-in shapes as a tensor.
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
