"""Sets of images to score: a folder of image files, a samples `.npz`, or any data source `train` reads.

Each becomes a stream of uint8 N×C×H×W batches of one size. Folders are decoded batch by batch, so
50k large images need not fit in memory; each file is also decoded once up front, so that a broken
one is skipped with a note instead of stopping feature extraction halfway. Feature extractors resize
to their own input size, but a batch must share one size, so a folder's images of another size than
most are resized to it (bicubic) with a note: FID is computed at the resolution the set mostly has.
A folder that `difftool sample` wrote is the samples its sample.json lists (not its grid.png), and
whatever file of a folder is not scored is named in a note.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftool.safeio import UnsafeFile
from difftool.data import center_crops, load_dataset
from difftool.errors import UserError, first_line
from difftool.sampling.folder import SETTINGS_FILE, SampleFolder
from difftool.images import (
    IMAGE_SUFFIXES,
    first_frame_note,
    image_files,
    open_image,
    printable,
    read_image,
    rgb_or_gray,
    visible_files,
    why_unreadable,
)

MIN_IMAGES = 2
# what np.load raises on a file that is not a complete .npz
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@contextlib.contextmanager
def open_npz(path: Path, what: str = ".npz file") -> Iterator[np.lib.npyio.NpzFile]:
    """An .npz archive of arrays, or one UserError: np.load would also return a bare .npy array, or
    bytes for a zip member that is not an array. Errors reading its members inside the block count too.
    A FIFO or a device is refused, never waited on."""
    try:
        with _open_regular(Path(path)) as file, np.load(file, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise UserError(f"{path} is a single .npy array, not an .npz archive of named arrays")
            others = [name for name in npz.zip.namelist() if not name.endswith(".npy")]
            if others:
                raise UserError(f"{path} is a zip archive but not an .npz of arrays (it holds {printable(others[0])})")
            yield npz
    except NPZ_ERRORS as err:
        raise UserError(f"{path} is not a readable {what} ({first_line(err, 120)})") from err


def _open_regular(path: Path):
    """The regular file `path` (a link to one is the user's own doing) opened for reading, without blocking on a
    FIFO: np.load of a FIFO waits forever for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFile(f"{path} is not a regular file (a FIFO, a device or a folder); give an .npz file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def npy_shape(npz: np.lib.npyio.NpzFile, name: str) -> tuple[int, ...]:
    """The shape of the array `name` of `npz`, from its header alone (the array may unpack to gigabytes)."""
    with npz.zip.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(member)[0]


@dataclass
class ImageSet:
    """`count` images of `size` (H, W); `batches` yields them in order."""

    description: str
    count: int
    size: tuple[int, int]
    _batches: Callable[[int], Iterator[torch.Tensor]] = field(repr=False)
    notes: list[str] = field(default_factory=list)
    asked: list[str | None] | None = None  # the class each image was sampled for, where a sample folder says

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        return self._batches(batch_size)

    @property
    def resolution(self) -> int:
        return max(self.size)


def from_tensor(images: torch.Tensor, description: str, notes: list[str] | None = None) -> ImageSet:
    """Images already in memory (uint8 N×C×H×W)."""
    _check_count(len(images), description)

    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

    return ImageSet(description, len(images), tuple(images.shape[-2:]), batches, notes or [])


def open_images(path: str | Path) -> ImageSet:
    """A folder of images (searched recursively), a folder `difftool sample` wrote (its samples), or an
    `.npz` whose `arr_0` is uint8 N×H×W×C."""
    path = Path(path).expanduser()
    if path.suffix == ".npz" and path.is_file():
        return _from_npz(path)
    if path.is_dir():
        return _from_sample_folder(path) if SampleFolder.holds_samples(path) else _from_folder(path)
    if path.exists():
        raise UserError(f"{path} is neither a folder of images nor an .npz of samples (arr_0: uint8 N×H×W×C)")
    raise UserError(f"{path} does not exist; give a folder of images, a samples .npz or a model")


def is_image_source(path: str | Path) -> bool:
    """True for an .npz of images or a folder holding image files but no model."""
    path = Path(path).expanduser()
    if path.suffix == ".npz":
        return path.is_file()
    if not path.is_dir() or any((path / name).exists() for name in ("config.yaml", "model_index.json", "config.json")):
        return False
    return SampleFolder.holds_samples(path) or any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


def from_data_source(dataset: str, *, resolution: int, split: str = "train", max_images: int | None = None) -> ImageSet:
    """A data set as training would see it: shorter side resized to `resolution`, centre-cropped, no flips."""
    from difftool.config import DataConfig

    cfg = dataclasses.replace(DataConfig(), dataset=dataset, resolution=resolution, split=split,
                              max_images=max_images, label_column="none")
    data = load_dataset(cfg)
    return from_tensor(center_crops(data, resolution), data.source)


def _from_npz(path: Path) -> ImageSet:
    with open_npz(path) as npz:
        if "mu" in npz:
            raise UserError(f"{path} holds reference statistics, not images: pass it as --reference")
        key = "arr_0" if "arr_0" in npz else (list(npz.keys()) or [None])[0]
        if key is None:
            raise UserError(f"{path} holds no arrays")
        array = npz[key]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise UserError(f"{path}: {key} must be uint8 N×H×W×C with C = 1 or 3 (the layout of difftool sample "
                        f"--format npz); it is {array.dtype} {array.shape}")
    return from_tensor(torch.from_numpy(array).permute(0, 3, 1, 2), f"{path} ({len(array)} images)")


def _from_folder(root: Path) -> ImageSet:
    """Every image file under `root`; the other files are named in a note (hidden ones are not looked at)."""
    found = visible_files(root)
    images = image_files(root)
    kinds = "/".join(IMAGE_SUFFIXES)
    return _from_files(root, images, _left_out(root, found, images, f"not {kinds} images"))


def _from_sample_folder(root: Path) -> ImageSet:
    """A folder `difftool sample` wrote: the samples its sample.json lists, not its grid.png or anything else."""
    folder, count = SampleFolder.written(root)
    listed = folder.listed(count)
    missing = [p.name for p in listed if not p.is_file()]
    if missing:
        which = f"{missing[0]} and {len(missing) - 1} more are" if len(missing) > 1 else f"{missing[0]} is"
        raise UserError(f"{printable(root)} was written by difftool sample and its {SETTINGS_FILE} lists {count} "
                        f"samples, but {which} missing; finish it with difftool sample MODEL --resume --output "
                        f"{printable(root)} (the same options)")
    notes = _left_out(root, visible_files(root), [*listed, folder.settings_file],
                      f"not among the samples its {SETTINGS_FILE} lists")
    if folder.format == "npz":
        images = _from_npz(folder.npz)
        images.notes += notes
        return images
    images = _from_files(root, listed, notes)
    images.asked = [_asked_class(file) for file in listed] if images.count == len(listed) else None
    return images


def _asked_class(file: Path) -> str | None:
    """The class a PNG of `difftool sample` was made for (its `class` text), None for an unconditional one."""
    try:
        with open_image(file) as img:
            return getattr(img, "text", {}).get("class")
    except Exception:  # noqa: BLE001 - decoded before (`_from_files`); changed since: its class is unknown
        return None


def _left_out(root: Path, found: list[Path], used: list[Path], why: str) -> list[str]:
    """A note naming the files of `root` that are not scored, if there are any: no file is dropped unsaid."""
    others = sorted(set(found) - set(used))
    if not others:
        return []
    names = ", ".join(printable(p.relative_to(root)) for p in others[:3])
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    return [f"left out {len(others)} file{'s' if len(others) > 1 else ''} in {printable(root)} ({why}): {names}{more}"]


def _from_files(root: Path, files: list[Path], notes: list[str]) -> ImageSet:
    """The image `files` of `root`, at the size most of them have; broken ones are skipped with a note."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        checked = dict(zip(files, pool.map(_decoded_size, files), strict=True))
    sizes = {f: found[0] for f, found in checked.items() if not isinstance(found, str)}
    unreadable = [f"{printable(f.name)}: {why}" for f, why in checked.items() if isinstance(why, str)]
    several_frames = [printable(f.relative_to(root)) for f, found in checked.items()
                      if not isinstance(found, str) and found[1]]
    good, where = list(sizes), printable(root)
    if unreadable:
        _check_count(len(good), f"{where} (of its {len(files)} images, {len(unreadable)} could not be decoded, e.g. "
                                f"{unreadable[0]})")
        notes.append(f"skipped {len(unreadable)} of {len(files)} images in {where} that could not be decoded "
                     f"(e.g. {unreadable[0]})")
    _check_count(len(good), where)
    if several_frames:
        notes.append(first_frame_note(several_frames))
    size, count = collections.Counter(sizes.values()).most_common(1)[0]
    if count < len(good):
        notes.append(f"{len(good) - count} of {len(good)} images in {where} are not {size[1]}×{size[0]} "
                     f"like the rest; they are resized to it (bicubic) before the features are computed")
    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(good), batch_size):
                arrays = list(pool.map(lambda f: _read_rgb(f, size), good[start : start + batch_size]))
                yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    return ImageSet(f"{where} ({len(good)} images)", len(good), size, batches, notes)


def _decoded_size(file: Path) -> tuple[tuple[int, int], bool] | str:
    """(H, W) of an image file that decodes completely, as `_read_rgb` decodes it, and whether it has more
    frames than the first (which is the one read); else why it does not decode."""
    try:
        img, frames = read_image(file)
        return (img.height, img.width), frames
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail on hostile bytes in many ways; the file is skipped
        return why_unreadable(err, file)


def _read_rgb(file: Path, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 H×W×3 at `size`; 16-bit, palette, CMYK and alpha images handled like training data."""
    try:
        img = rgb_or_gray(read_image(file)[0]).convert("RGB")
        if (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return np.asarray(img)
    except Exception as err:  # decoded at the scan; it changed since (or fails in some other way)
        raise UserError(f"{printable(file)} could not be decoded ({why_unreadable(err, file)}); "
                        f"remove or replace it") from err


def _check_count(count: int, description: str) -> None:
    if count < MIN_IMAGES:
        raise UserError(f"{description} holds {count} image{'s' if count != 1 else ''}; the metrics need at least "
                        f"{MIN_IMAGES} (and FID about 10,000 to be comparable)")
