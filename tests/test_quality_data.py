"""benchmarks/quality_data.py: the folders the quality benchmark trains on hold the images it judges with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quality_data import make_set, write_set  # noqa: E402


def read_folder(folder: Path) -> list[np.ndarray]:
    """The folder's images in the order they were written (file names number them across classes)."""
    images = []
    for path in sorted(folder.glob("*/*.png"), key=lambda p: p.name):
        with Image.open(path) as image:
            images.append(np.asarray(image))
    return images


def test_a_folder_written_for_one_count_is_not_reused_for_another(tmp_path):
    small = write_set("dark-shapes", tmp_path, resolution=8, num_images=8)
    large = write_set("dark-shapes", tmp_path, resolution=8, num_images=12)
    assert small != large
    assert len(read_folder(small)) == 8
    images, _, _ = make_set("dark-shapes", resolution=8, num_images=12)
    assert np.array_equal(np.stack(read_folder(large)), images)
    assert write_set("dark-shapes", tmp_path, resolution=8, num_images=8) == small  # the same images: reused
