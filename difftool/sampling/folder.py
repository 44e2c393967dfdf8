"""A folder `difftool sample` writes: its names, what it holds, how it is written, resumed and read back.

    OUTPUT/
      sample.json        the settings every image was made with (written first: a resume is checked against it)
      000000.png ...     image i as NNNNNN.png, its settings and class in PNG text   (--format png)
      samples.npz        arr_0 = uint8 N×H×W×C in index order, arr_1 = class ids   (--format npz)
      .parts/            npz batches until the last is written, then merged into samples.npz
      grid.png           the first images, one column per class
      trajectory/        with --trajectory: NNNNNN.png (x_t and predicted x0 at chosen steps), NNNNNN.webp (animated)

`evaluate` reads such a folder by what its sample.json lists, so both sides use these names.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from difftool.errors import UserError, first_line
from difftool.images import printable, read_image, save_png
from difftool.output_rules import Existing
from difftool.safeio import TMP_PREFIX, atomic_path, make_folder, read_json, write_text

SETTINGS_FILE = "sample.json"
NPZ_FILE = "samples.npz"
PARTS_DIR = ".parts"
GRID_FILE = "grid.png"
TRAJECTORY_DIR = "trajectory"
FORMATS = ("png", "npz")
# Settings that may differ between a run and its --resume: they do not change any image.
RESUMABLE = {"model", "num_images", "difftool_version"}
# Settings added after 0.1.0, with the value that folders written without them were made with.
ADDED_SETTINGS = {"guidance_rescale": 0.0}


class SampleFolder:
    """One output folder of `difftool sample`, in one format (png or npz)."""

    def __init__(self, root: Path, fmt: str = "png"):
        self.root, self.format = Path(root), fmt

    @staticmethod
    def holds_samples(path: str | Path) -> bool:
        """A folder `difftool sample` wrote (it has a sample.json): read as the samples its sample.json lists, never
        its grid.png."""
        return (Path(path).expanduser() / SETTINGS_FILE).is_file()

    @classmethod
    def written(cls, root: Path) -> tuple[SampleFolder, int]:
        """A folder as `difftool sample` recorded it: in its format, and the number of samples its sample.json lists."""
        path = Path(root) / SETTINGS_FILE
        try:
            record = read_json(path)
            count, fmt = int(record["num_images"]), record.get("format", "png")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{printable(path)} is damaged ({first_line(err, 120)}); sample the folder again, or "
                            f"remove {SETTINGS_FILE} to score the image files in it as they are") from err
        if count < 0 or fmt not in FORMATS:
            raise UserError(f"{printable(path)} is damaged (num_images {count}, format {fmt!r}); sample the folder "
                            f"again, or remove {SETTINGS_FILE} to score the image files in it as they are")
        return cls(root, fmt), count

    def image(self, index: int) -> Path:
        return self.root / f"{index:06d}.png"

    @property
    def settings_file(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def npz(self) -> Path:
        return self.root / NPZ_FILE

    @property
    def grid(self) -> Path:
        return self.root / GRID_FILE

    @property
    def trajectories(self) -> Path:
        return self.root / TRAJECTORY_DIR

    def listed(self, count: int) -> list[Path]:
        """The files that hold the first `count` samples."""
        return [self.npz] if self.format == "npz" else [self.image(i) for i in range(count)]

    # ------------------------------------------------------------ what is there

    def _image_files(self) -> dict[int, Path]:
        """NNNNNN.png files by index (complete files only: partial writes have temporary names)."""
        return {int(p.stem): p for p in self.root.glob("*.png") if re.fullmatch(r"\d{6,}", p.stem)}

    def existing(self) -> set[int]:
        """Indices already written."""
        if self.format == "png":
            return set(self._image_files())
        found: set[int] = set()
        if self.npz.is_file():
            with np.load(self.npz) as npz:
                found |= set(range(len(npz["arr_0"])))
        for part in (self.root / PARTS_DIR).glob("part-*.npz"):
            with np.load(part) as npz:
                found |= {int(i) for i in npz["indices"]}
        return found

    def todo(self, num_images: int, settings: dict, existing: Existing) -> list[int]:
        """Indices still to make; refuses to touch images made before unless `existing` says how."""
        wanted = range(num_images)
        if existing.overwrite or not self.root.exists():
            return list(wanted)
        done = self.existing()
        clash = self.settings_file.is_file() or bool(done & set(wanted))
        if clash and not existing.resume:
            raise UserError(f"{self.root} already holds samples; add --resume to make only the missing images with "
                            f"the same settings, --overwrite to replace them, or choose another --output")
        if not clash:
            return list(wanted)
        if not self.settings_file.is_file():
            raise UserError(f"cannot resume in {self.root}: it has images but no {SETTINGS_FILE} to check their "
                            f"settings; use --overwrite or another --output")
        previous = json.loads(self.settings_file.read_text())
        current = {**settings, "format": self.format}
        differ = sorted(k for k in current.keys() - RESUMABLE if previous.get(k, ADDED_SETTINGS.get(k)) != current[k])
        if differ:
            changes = ", ".join(f"{k} {previous.get(k)!r} -> {current[k]!r}" for k in differ)
            raise UserError(f"cannot resume in {self.root}: its images were made with other settings ({changes}); "
                            f"use --overwrite or another --output")
        return [i for i in wanted if i not in done]

    # ------------------------------------------------------------ writing

    def prepare(self, settings_record: dict, *, overwrite: bool) -> None:
        """Create the folder; drop what an interrupted write left, and with --overwrite the old samples; then write
        sample.json first, so that an interrupted request can be resumed and checked against it."""
        make_folder(self.root)
        doomed = list(self.root.glob(f"{TMP_PREFIX}*"))
        if overwrite:
            doomed += list(self._image_files().values())
            doomed += [self.npz, self.grid, self.settings_file]
            shutil.rmtree(self.root / PARTS_DIR, ignore_errors=True)
            shutil.rmtree(self.trajectories, ignore_errors=True)
        for path in doomed:
            path.unlink(missing_ok=True)
        if self.format == "npz":
            make_folder(self.root / PARTS_DIR)
        write_text(self.settings_file, json.dumps(settings_record, indent=2) + "\n")

    def write_batch(self, batch: list[int], images: torch.Tensor, labels: list[int | None],
                    metadata: Callable[[int], dict[str, str]]) -> None:
        """uint8 N×C×H×W images of the indices `batch`: PNGs with their `metadata(i)`, or one npz part."""
        if self.format == "png":
            for index, image in zip(batch, images, strict=True):
                save_png(image, self.image(index), metadata(index))
            return
        label_array = np.array(labels) if labels and labels[0] is not None else np.zeros(0)
        with atomic_path(self.root / PARTS_DIR / f"part-{batch[0]:06d}.npz") as tmp, tmp.open("wb") as f:
            np.savez(f, indices=np.array(batch), images=images.permute(0, 2, 3, 1).numpy(), labels=label_array)

    def merge_parts(self, num_images: int, labelled: bool) -> None:
        """samples.npz: arr_0 = uint8 N×H×W×C in index order (what FID tools read), arr_1 = class ids."""
        images: dict[int, np.ndarray] = {}
        labels: dict[int, int] = {}
        if self.npz.is_file():
            with np.load(self.npz) as npz:
                images.update(enumerate(npz["arr_0"]))
                if "arr_1" in npz:
                    labels.update(enumerate(npz["arr_1"].tolist()))
        for part in sorted((self.root / PARTS_DIR).glob("part-*.npz")):
            with np.load(part) as npz:
                images.update(zip(npz["indices"].tolist(), npz["images"], strict=True))
                labels.update(zip(npz["indices"].tolist(), npz["labels"].tolist(), strict=False))
        missing = [i for i in range(num_images) if i not in images]
        if missing:
            raise UserError(f"{len(missing)} images are missing from {self.root} (first: {missing[0]}); run again "
                            f"with --resume")
        arrays = {"arr_0": np.stack([images[i] for i in range(num_images)])}
        if labelled:
            arrays["arr_1"] = np.array([labels[i] for i in range(num_images)])
        with atomic_path(self.npz) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
        shutil.rmtree(self.root / PARTS_DIR, ignore_errors=True)

    def first_images(self, n: int) -> torch.Tensor:
        """uint8 N×C×H×W: the first `n` samples, as written."""
        if self.format == "png":
            tiles = torch.stack([torch.from_numpy(np.array(read_image(self.image(i))[0])) for i in range(n)])
            tiles = tiles.unsqueeze(-1) if tiles.ndim == 3 else tiles
        else:
            with np.load(self.npz) as npz:
                tiles = torch.from_numpy(npz["arr_0"][:n])
        return tiles.permute(0, 3, 1, 2)
