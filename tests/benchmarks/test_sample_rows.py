"""benchmarks/sample_rows.py: the first images of each samples file, one row per file, in the order given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sample_rows.py"


def samples_file(path: Path, value: int, count: int = 5) -> Path:
    images = np.full((count, 4, 4, 3), value, dtype=np.uint8)
    images[:, 0, 0] = np.arange(count)[:, None]  # each image's own corner: the order must survive
    np.savez(path, images, np.zeros(count, dtype=np.int64))
    return path


def test_rows_are_the_files_in_order_and_their_first_images(tmp_path):
    dark, light = samples_file(tmp_path / "dark.npz", 30), samples_file(tmp_path / "light.npz", 220)
    out = tmp_path / "rows.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "--row", f"teacher={dark}", "--row", f"student={light}",
                           "--per-row", "3", "--scale", "2", "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as png:
        grid, rows = np.asarray(png.convert("RGB")), png.text["rows"]
    assert rows == "teacher, student"
    tile, pad = 4 * 2, 2
    assert grid.shape[:2] == (2 * tile + 3 * pad, 3 * tile + 4 * pad), "3 per row, 2 rows, enlarged twice"
    top, bottom = grid[pad:pad + tile], grid[2 * pad + tile:2 * pad + 2 * tile]
    assert top[4, pad + 4, 0] == 30 and bottom[4, pad + 4, 0] == 220, "the first file on top"
    corners = [top[0, pad + i * (tile + pad), 0] for i in range(3)]
    assert corners == [0, 1, 2], "the first images, in their order"


def test_a_row_without_a_name_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--row", str(tmp_path / "x.npz"), "--output",
                           str(tmp_path / "o.png")], capture_output=True, text=True)
    assert done.returncode != 0 and "NAME=FILE.npz" in done.stderr
