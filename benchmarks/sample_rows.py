"""Rows of samples from several `.npz` files (`difftool sample --format npz`, `difftool evaluate --sweep`), one
row per file, the first N images of each: the same seeds side by side, to look at what a number says.

    python benchmarks/sample_rows.py --row "teacher=runs/eval/samples/samples.npz" \
        --row "student 4 steps=runs/eval-cd/samples/lcm-4/samples.npz" --output benchmarks/figures/rows.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from difftool.images import enlarge, make_grid, save_png


def first_images(path: Path, count: int) -> torch.Tensor:
    """uint8 count x C x H x W: the first images of a samples .npz (N x H x W x C, classes beside them)."""
    with np.load(path) as saved:
        images = saved["arr_0"][:count]
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="NAME=FILE.npz, top to bottom (repeatable)")
    parser.add_argument("--per-row", type=int, default=16)
    parser.add_argument("--scale", type=int, default=3, help="nearest-neighbour enlargement")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    rows = [row.partition("=") for row in args.row]
    if any(not name or not file for name, _, file in rows):
        sys.exit("--row: write NAME=FILE.npz")
    tiles = torch.cat([first_images(Path(file), args.per_row) for _, _, file in rows])
    save_png(make_grid(enlarge(tiles, args.scale), ncol=args.per_row), args.output,
             {"rows": ", ".join(name for name, _, _ in rows)})
    print(f"{args.output}: rows {', '.join(name for name, _, _ in rows)}")


if __name__ == "__main__":
    main()
