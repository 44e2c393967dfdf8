"""benchmarks/quality_data.py: the folders the quality benchmark trains on hold the images it judges with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quality import train_args, variant_steps  # noqa: E402
from quality_data import make_set, write_set  # noqa: E402

from difftool.config import load_config  # noqa: E402


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


def test_a_variant_trains_its_own_steps_then_steps_then_its_recipes(tmp_path):
    def max_steps(args: list[str]) -> str | None:
        return args[args.index("--max-steps") + 1] if "--max-steps" in args else None

    own = ["train.batch_size=32", "train.max_steps=4000"]
    assert variant_steps("quickstart", own, 600) == 4000
    assert max_steps(train_args("quickstart", own, tmp_path, tmp_path / "run", steps=600, resolution=16)) is None
    assert variant_steps("quickstart", ["train.lr=0.002"], 600) == 600
    assert max_steps(train_args("quickstart", ["train.lr=0.002"], tmp_path, tmp_path / "run", steps=600,
                                resolution=16)) == "600"
    assert variant_steps("folder32", [], None) == load_config("folder32").train.max_steps
    assert max_steps(train_args("folder32", [], tmp_path, tmp_path / "run", steps=None, resolution=16)) is None
