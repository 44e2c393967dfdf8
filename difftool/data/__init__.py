"""Training data: one registry of sources (shapes, Hub, folder) -> uint8 tensors in memory -> batches.

Every source is decoded once into uint8 tensors held in memory (and, for folders and the Hub,
cached on disk), because small pixel-space models are fed faster from memory than from a
DataLoader that decodes files on every step. Augmentation (crop, flip, scaling to [-1, 1]) then
runs in torch on the selected images only, driven by the caller's generator, so a batch depends
only on (data, indices, generator state) and a resumed run sees the same batches.

A new data source is one loader `(cfg, cache) -> ImageData` in its own module here, added to
`SOURCES` below together with the rule in `source_kind` that picks it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difftool.errors import UserError
from difftool.images import IMAGE_SUFFIXES
from difftool.data.cache import default_cache_dir
from difftool.data.decode import ImageData
from difftool.data.folder import load_folder
from difftool.data.hub import DATASET_ALIASES, HubAlias, from_hf_dataset, load_hub
from difftool.data.shapes import SHAPE_NAMES, make_shapes

__all__ = [
    "CROPS", "DATASET_ALIASES", "IMAGE_SUFFIXES", "SHAPE_NAMES", "SOURCES", "HubAlias", "ImageData", "center_crops",
    "data_folder", "default_cache_dir", "from_hf_dataset", "load_dataset", "make_batch", "make_shapes",
    "source_kind",
]



CROPS = ("center", "random")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_dataset(cfg: Any, cache_dir: Path | None = None) -> ImageData:
    """Load the data set that `cfg` (a DataConfig) names, decoding it at `cfg.resolution`.

    `cfg.dataset` is tried in this order: "shapes", an alias from DATASET_ALIASES, an existing
    folder, and otherwise a Hub data set name (write ./name to force a folder that shares an
    alias's name). Folder and Hub data are cached under `cache_dir`, which defaults to
    $DIFFTOOL_CACHE or ~/.cache/difftool/data.
    """
    if cfg.channels not in (None, 1, 3):
        raise UserError(f"data.channels must be 1, 3 or null (follow the data), got {cfg.channels!r}")
    if cfg.resolution < 1:
        raise UserError(f"data.resolution must be a positive number of pixels, got {cfg.resolution}")
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return SOURCES[source_kind(cfg.dataset)](cfg, cache)


def source_kind(name: str) -> str:
    """Which entry of SOURCES loads the data set `name` (or a UserError saying why none does)."""
    if name == "shapes":
        return "shapes"
    if name in DATASET_ALIASES:
        return "hub"
    if data_folder(name) is not None:
        return "folder"
    path = Path(name).expanduser()
    if path.exists():
        raise UserError(f"dataset {name} is a file, not a folder; point --dataset at a folder of images")
    if name.startswith(("./", "../", "/", "~")) or (os.sep in name and not _HUB_ID.match(name)):
        raise UserError(f"dataset folder not found: {name}; check the path, "
                        "or use --dataset shapes for the built-in data")
    return "hub"


def _load_shapes(cfg: Any, cache: Path) -> ImageData:
    # Not cached: rendering 10k images at 32 px takes ~0.2 s, too little to be worth a cache
    # file per resolution and size.
    count = cfg.num_images if cfg.max_images is None else min(cfg.num_images, cfg.max_images)
    return make_shapes(count, cfg.resolution, channels=cfg.channels or 3)


def _load_folder(cfg: Any, cache: Path) -> ImageData:
    return load_folder(data_folder(cfg.dataset), cfg, cache)


# The registry of data sources: kind -> loader(cfg, cache). `source_kind` decides the kind.
SOURCES: dict[str, Callable[[Any, Path], ImageData]] = {"shapes": _load_shapes, "hub": load_hub, "folder": _load_folder}


def data_folder(dataset: str) -> Path | None:
    """The local folder that `dataset` names for `load_dataset`, if it names one."""
    path = Path(dataset).expanduser()
    return path if dataset != "shapes" and dataset not in DATASET_ALIASES and path.is_dir() else None


def make_batch(
    data: ImageData,
    indices: torch.Tensor,
    *,
    resolution: int,
    random_flip: bool,
    crop: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop, flip and scale the images at `indices` into a float32 batch in [-1, 1].

    Returns (B x C x resolution x resolution, labels[indices] or None), on the CPU. Random crop
    offsets are drawn before the flips, both from `generator`; a stacked data set stored at
    exactly resolution x resolution needs no crop (and draws none) and takes a vectorised path.
    """
    if crop not in CROPS:
        raise UserError(f"unknown crop '{crop}'; use one of {', '.join(CROPS)}")
    indices = torch.as_tensor(indices, dtype=torch.long)
    images = data.images
    if isinstance(images, torch.Tensor) and images.shape[-2:] == (resolution, resolution):
        batch = images.index_select(0, indices)
    else:
        offsets = torch.rand(len(indices), 2, generator=generator) if crop == "random" else None
        batch = torch.stack([
            _crop(images[i], resolution, None if offsets is None else offsets[j], index=i)
            for j, i in enumerate(indices.tolist())
        ])
    if random_flip:
        flip = torch.rand(len(indices), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    labels = None if data.labels is None else data.labels.index_select(0, indices)
    return batch.float().div_(127.5).sub_(1.0), labels


def center_crops(data: ImageData, resolution: int) -> torch.Tensor:
    """Every image centre-cropped to resolution x resolution, uint8 N x C x H x W (what evaluation compares)."""
    images = data.images
    if isinstance(images, torch.Tensor) and images.shape[-2:] == (resolution, resolution):
        return images
    return torch.stack([_crop(image, resolution, None, index=i) for i, image in enumerate(images)])


def _crop(image: torch.Tensor, resolution: int, offset: torch.Tensor | None, index: int) -> torch.Tensor:
    """A resolution x resolution window: centred, or placed by `offset` (two uniforms in [0, 1))."""
    height, width = image.shape[-2:]
    if height < resolution or width < resolution:
        raise ValueError(f"image {index} is {width}x{height}, smaller than resolution {resolution}; "
                         "load the data at the resolution you train at")
    if offset is None:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = min(int(offset[0] * (height - resolution + 1)), height - resolution)
        left = min(int(offset[1] * (width - resolution + 1)), width - resolution)
    return image[:, top : top + resolution, left : left + resolution]
