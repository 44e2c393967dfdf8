"""benchmarks/quality_data.py: the folders the quality benchmark trains on hold the images it judges with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality import train_args, trained, variant_steps  # noqa: E402
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


def test_a_plateau_recipe_trains_with_its_evaluations_and_they_are_timed_apart(tmp_path):
    plateau = ["train.until=plateau", "train.lr_schedule=constant"]
    args = train_args("folder32", plateau, tmp_path, tmp_path / "run", steps=None, resolution=16)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert load_config("folder32", sets).train.until == "plateau", "no eval.every=0: the rule needs its evaluations"
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    lines = [{"step": 1000, "loss": 0.1}, {"step": 1000, "eval/fd_judge": 2.0, "eval/seconds": 30.0},
             {"step": 2000, "loss": 0.1}, {"step": 2000, "until/decided": "levelled", "until/end": 2200},
             {"step": 2200, "loss": 0.09}, {"step": 2200, "eval/fd_judge": 1.0, "eval/seconds": 20.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "eval" / "judge.json").write_text(json.dumps({"report": {"seconds": 50.0}}))
    done = trained(run, 1000.0)
    assert (done.steps, done.train_s, done.eval_s, done.stop) == (2200, 900.0, 100.0, "levelled at step 2000")


def test_sizes_go_down_to_a_few_pixels():
    images, labels, classes = make_set("sizes", resolution=32, num_images=200)
    background = images[:, :1, :1].astype(int)  # every shape stays whole, so a corner is background
    area = (np.abs(images.astype(int) - background).sum(-1) > 60).sum((1, 2))
    assert classes == ["circle", "square", "triangle", "cross"] and np.bincount(labels).tolist() == [50] * 4
    assert area.min() <= 12 and area.max() >= 250, (area.min(), area.max())
    dark = make_set("dark-shapes", resolution=32, num_images=200)[0]
    assert np.array_equal(make_set("dark-shapes", resolution=32, num_images=200)[0], dark), "seeded"


def test_photos_are_crops_of_their_own_photo():
    photos, labels, classes = make_set("photos", resolution=16, num_images=80)
    assert photos.shape == (80, 16, 16, 3) and len(classes) == 8 and np.bincount(labels).tolist() == [10] * 8
    means = np.stack([photos[labels == k].reshape(-1, 3).mean(0) for k in range(8)])
    spread = [photos[labels == k].reshape(10, -1, 3).mean(1).std(0).mean() for k in range(8)]
    gaps = np.abs(means[:, None] - means[None]).sum(-1)[~np.eye(8, dtype=bool)]
    assert np.median(gaps) > 2 * np.median(spread), "crops of one photo look alike, more than other photos' do"
