"""Training data: built-in shapes, local image folders and Hub data sets -> uint8 tensors -> batches.

Every source is decoded once into uint8 tensors held in memory (and, for folders and the Hub,
cached on disk), because small pixel-space models are fed faster from memory than from a
DataLoader that decodes files on every step. Augmentation (crop, flip, scaling to [-1, 1]) then
runs in torch on the selected images only, driven by the caller's generator, so a batch depends
only on (data, indices, generator state) and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from difftool.errors import UserError, first_line
from difftool.images import (
    first_frame_note,
    open_image,
    printable,
    several_frames,
    why_unreadable,
)

logger = logging.getLogger("difftool")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHAPE_NAMES = ["circle", "square", "triangle", "ring", "cross"]
CROPS = ("center", "random")

# Bump when decoding or resizing changes, so that old cache files are no longer hit.
_CACHE_FORMAT = 1
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LUMA = (299, 587, 114)  # ITU-R 601 weights in thousandths, the same that PIL's convert("L") uses


@dataclass
class ImageData:
    """Decoded training images held in memory as uint8, ready for on-the-fly augmentation.

    Images are stacked (N x C x H x W) when all share one size, which is what makes `make_batch`
    a single `index_select`; otherwise they are a list of C x H x W tensors whose shorter side
    equals the resolution they were loaded at.
    """

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | None
    label_names: list[str] | None
    channels: int
    source: str

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class HubAlias:
    """A short data set name: its Hub repo and columns (label_column None: the data set has no labels)."""

    repo_id: str
    image_column: str
    label_column: str | None


DATASET_ALIASES: dict[str, HubAlias] = {
    "mnist": HubAlias("ylecun/mnist", "image", "label"),
    "fashion_mnist": HubAlias("zalando-datasets/fashion_mnist", "image", "label"),
    "cifar10": HubAlias("uoft-cs/cifar10", "img", "label"),
    "cifar100": HubAlias("uoft-cs/cifar100", "img", "fine_label"),
    "celeba": HubAlias("nielsr/CelebA-faces", "image", None),
    "flowers": HubAlias("nelorth/oxford-flowers", "image", "label"),
    "butterflies": HubAlias("huggan/smithsonian_butterflies_subset", "image", None),
    "pokemon": HubAlias("huggan/pokemon", "image", None),
}


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
    name = cfg.dataset
    if name == "shapes":
        # Not cached: rendering 10k images at 32 px takes ~0.2 s, too little to be worth a cache
        # file per resolution and size.
        count = cfg.num_images if cfg.max_images is None else min(cfg.num_images, cfg.max_images)
        return make_shapes(count, cfg.resolution, channels=cfg.channels or 3)
    if name in DATASET_ALIASES:
        return _load_hub(cfg, cache)
    folder = data_folder(name)
    if folder is not None:
        return _load_folder(folder, cfg, cache)
    path = Path(name).expanduser()
    if path.exists():
        raise UserError(f"dataset {name} is a file, not a folder; point --dataset at a folder of images")
    if name.startswith(("./", "../", "/", "~")) or (os.sep in name and not _HUB_ID.match(name)):
        raise UserError(f"dataset folder not found: {name}; check the path, "
                        "or use --dataset shapes for the built-in data")
    return _load_hub(cfg, cache)


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


# ---------------------------------------------------------------- built-in shapes

_SHAPES_SEED = 1234  # changing it changes the built-in data set
_PARAM_CHUNK = 1024  # images whose parameters come from one seeded generator
# Render in pieces this small (ATen's grain size): torch then runs each op on the calling thread,
# which bounds memory and avoids thread hand-offs that cost far more than the work when the
# cores are shared with other processes (measured: 0.2 s serial vs 2-18 s contended for 10k).
_SERIAL_ELEMENTS = 1 << 15
_FG_CANDIDATES = 8
_MIN_CONTRAST = 0.4  # luma difference between shape and background, in [0, 1]


def make_shapes(num_images: int, resolution: int, channels: int = 3) -> ImageData:
    """The built-in data set: one anti-aliased coloured shape on a plain background per image.

    Image i has class i % 5 and its geometry and colours come from a generator seeded by i's
    chunk alone, so image i is the same shape at every resolution and the first N images do
    not depend on `num_images`. Shapes span 50-85 % of the image and lie fully inside it,
    large enough to tell apart at 16 px.
    """
    params = _shape_params(num_images)
    images = torch.empty(num_images, 3, resolution, resolution, dtype=torch.uint8)
    per_piece = max(1, _SERIAL_ELEMENTS // (3 * resolution * resolution))  # whole images, or
    band = max(1, min(resolution, _SERIAL_ELEMENTS // (3 * resolution)))  # bands of rows of one
    for label, name in enumerate(SHAPE_NAMES):
        members = slice(label, None, len(SHAPE_NAMES))
        of_class, class_params = images[members], {k: v[members] for k, v in params.items()}
        for start in range(0, len(of_class), per_piece):
            part = slice(start, start + per_piece)
            piece_params = {k: v[part] for k, v in class_params.items()}
            for top in range(0, resolution, band):
                rows = slice(top, top + band)
                of_class[part, :, rows] = _render_shapes(name, piece_params, resolution, rows)
    return ImageData(
        images=_to_channels(images, channels),
        labels=torch.arange(num_images) % len(SHAPE_NAMES),
        label_names=list(SHAPE_NAMES),
        channels=channels,
        source=f"built-in shapes ({num_images} images)",
    )


def _shape_params(num_images: int) -> dict[str, torch.Tensor]:
    """Size, position, rotation and colours (0-255) per image, drawn per fixed-size chunk of images."""
    chunks = []
    for k in range(math.ceil(num_images / _PARAM_CHUNK)):
        g = torch.Generator().manual_seed(_SHAPES_SEED + k)
        chunks.append(torch.rand(_PARAM_CHUNK, 7 + 3 * _FG_CANDIDATES, generator=g, dtype=torch.float64))
    u = torch.cat(chunks)[:num_images]
    radius = (0.50 + 0.35 * u[:, 0]) / 2  # circumradius, as a fraction of the image side
    luma = torch.tensor(_LUMA, dtype=torch.float64) / 1000
    background = u[:, 4:7]
    candidates = u[:, 7:].reshape(-1, _FG_CANDIDATES, 3)
    contrast = (candidates @ luma - (background @ luma)[:, None]).abs()
    good = contrast >= _MIN_CONTRAST
    foreground = candidates[torch.arange(len(u)), good.to(torch.uint8).argmax(1)]  # the first good one
    # No candidate contrasts enough: white or black always does, since one is >= 0.5 away.
    extreme = ((background @ luma) < 0.5).to(torch.float64)[:, None].expand(-1, 3)
    foreground = torch.where(good.any(1)[:, None], foreground, extreme)
    params = {
        "radius": radius,
        "cx": radius + (1 - 2 * radius) * u[:, 1],
        "cy": radius + (1 - 2 * radius) * u[:, 2],
        # Tilted by at most 20 degrees: squares stay squares (not diamonds), crosses stay "+"
        # and triangles point up, so each class has one recognisable outline.
        "theta": math.radians(40) * (u[:, 3] - 0.5),
        "background": 255 * background,
        "foreground": 255 * foreground,
    }
    return {k: v.to(torch.float32) for k, v in params.items()}


def _render_shapes(name: str, params: dict[str, torch.Tensor], resolution: int, rows: slice) -> torch.Tensor:
    """Render `rows` of images of one kind with analytic anti-aliasing, as uint8 N x 3 x rows x W.

    Coverage is a one-pixel ramp of the signed distance to the outline: as smooth as heavy
    supersampling at a fraction of its cost.
    """
    centres = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    dx = centres[None, None, :] - params["cx"][:, None, None]
    dy = centres[None, rows, None] - params["cy"][:, None, None]
    cos, sin = torch.cos(params["theta"])[:, None, None], torch.sin(params["theta"])[:, None, None]
    x, y = cos * dx + sin * dy, cos * dy - sin * dx  # rotated coordinates
    dist = _signed_distance(name, x, y, params["radius"][:, None, None])
    coverage = dist.mul_(-resolution).add_(0.5).clamp_(0, 1)[:, None]
    background, foreground = params["background"][:, :, None, None], params["foreground"][:, :, None, None]
    pixels = torch.addcmul(background, foreground - background, coverage)
    return pixels.add_(0.5).to(torch.uint8)  # rounds: values are >= 0


def _signed_distance(name: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Distance to the outline of a shape of circumradius r (negative inside), in image-side units."""
    if name == "circle":
        return torch.hypot(x, y) - r
    if name == "ring":
        return (torch.hypot(x, y) - 0.75 * r).abs() - 0.25 * r  # hole radius r / 2
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) - r / math.sqrt(2)
    if name == "triangle":  # equilateral: the three edges lie r / 2 from the centre
        edges = [x * math.cos(a) + y * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) - r / 2
    # cross: two bars of half-length 0.95 r and half-width 0.3 r, so its corners lie at ~r
    ax, ay = x.abs(), y.abs()
    horizontal = torch.maximum(ax - 0.95 * r, ay - 0.3 * r)
    vertical = torch.maximum(ay - 0.95 * r, ax - 0.3 * r)
    return torch.minimum(horizontal, vertical)


# ---------------------------------------------------------------- local folders


def _load_folder(root: Path, cfg: Any, cache: Path) -> ImageData:
    files, labels, label_names = _scan_folder(root, use_labels=cfg.label_column != "none")
    if cfg.max_images is not None and cfg.max_images < len(files):
        files, labels = files[: cfg.max_images], None if labels is None else labels[: cfg.max_images]
        _warn_dropped_classes(labels, label_names, cfg.max_images)
    key = {
        "kind": "folder",
        "root": str(root.resolve()),
        "files": [[f.relative_to(root).as_posix(), *_stat(f)] for f in files],
        "labels": labels is not None,
        "resolution": cfg.resolution,
        "channels": cfg.channels,
    }

    def build() -> ImageData:
        what = f"folder {printable(root)}"
        decoded, labels_kept = _decode_all(files, labels, cfg.resolution, what)
        return _assemble(decoded, labels_kept, label_names, cfg.channels, what)

    return _cached(cache, key, f"{root.resolve().name}-{cfg.resolution}px", build)


def _scan_folder(root: Path, use_labels: bool) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Image files under `root` in a stable order; classes are the immediate subfolders (if >= 2).

    Hidden files and folders are skipped (macOS "._x.jpg" files are not images).
    """
    rel = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in p.relative_to(root).parts)
        and p.is_file()
    )
    if not rel:
        raise UserError(f"no images found in {root} (looked for {'/'.join(IMAGE_SUFFIXES)} recursively); "
                        "point --dataset at a folder of images")
    files = [root / r for r in rel]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    if not use_labels or len(classes) < 2:
        return files, None, None
    loose = [r.as_posix() for r in rel if len(r.parts) == 1]
    if loose:
        raise UserError(f"{root} has class subfolders ({', '.join(classes)}) but also {len(loose)} images "
                        f"directly inside it (e.g. {loose[0]}); move them into a class folder, or "
                        "pass --label-column none to train without labels")
    ids = {name: i for i, name in enumerate(classes)}
    return files, [ids[r.parts[0]] for r in rel], classes


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------- Hugging Face Hub


def _load_hub(cfg: Any, cache: Path) -> ImageData:
    import datasets  # imported here: it takes a second and most commands never need it

    alias = DATASET_ALIASES.get(cfg.dataset)
    if alias is not None:
        cfg = dataclasses.replace(
            cfg,
            dataset=alias.repo_id,
            image_column=cfg.image_column or alias.image_column,
            label_column=cfg.label_column or alias.label_column or "none",
        )
    try:
        ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
    except Exception as err:  # any failure here (network, name, split) has one remedy for the user
        reason = first_line(err)
        raise UserError(f"could not load data set '{cfg.dataset}' (split '{cfg.split}') from the Hugging Face Hub: "
                        f"{reason}; check the name and split, or offline use --dataset shapes (built in) "
                        "or a local folder of images") from err
    image_column, label_column = _hub_columns(ds, cfg)
    key = {
        "kind": "hub",
        "name": cfg.dataset,
        "split": cfg.split,
        "image_column": image_column,
        "label_column": label_column,
        # datasets keeps no public hash of the content; the private fingerprint changes with it
        "fingerprint": getattr(ds, "_fingerprint", None),
        "max_images": cfg.max_images,
        "resolution": cfg.resolution,
        "channels": cfg.channels,
    }
    label = f"{cfg.dataset}-{cfg.split}-{cfg.resolution}px"
    return _cached(cache, key, label, lambda: from_hf_dataset(ds, cfg))


def from_hf_dataset(ds: Any, cfg: Any) -> ImageData:
    """Decode a `datasets.Dataset` into ImageData, following the columns and limits in `cfg`.

    Images are decoded from their stored bytes by the same code as folder images, so every
    source gets the same mode handling and resizing; undecodable rows are skipped and counted.
    Nothing is cached here: `load_dataset` caches what this returns.
    """
    import datasets

    image_column, label_column = _hub_columns(ds, cfg)
    truncate = cfg.max_images is not None and cfg.max_images < len(ds)
    if truncate:
        ds = ds.select(range(cfg.max_images))
    labels, label_names = (None, None) if label_column is None else _hub_labels(ds, label_column, cfg.dataset)
    if truncate:
        _warn_dropped_classes(labels, label_names, cfg.max_images)
    column = ds.select_columns([image_column])
    if isinstance(ds.features[image_column], datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))
    what = f"{cfg.dataset} [{cfg.split}]"
    decoded, labels = _decode_all((row[image_column] for row in column), labels, cfg.resolution, what)
    return _assemble(decoded, labels, label_names, cfg.channels, what)


def _hub_columns(ds: Any, cfg: Any) -> tuple[str, str | None]:
    """The image column and label column (or None): as configured, else detected."""
    import datasets

    features = ds.features
    columns = ", ".join(features)
    if cfg.image_column is not None:
        if cfg.image_column not in features:
            raise UserError(f"image column '{cfg.image_column}' not found in {cfg.dataset} (columns: {columns}); "
                            "pass one of them with --image-column NAME")
        image = cfg.image_column
    else:
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        named = [c for c in ("image", "img", "pixel_values") if c in features]
        if not typed + named:
            raise UserError(f"no image column found in {cfg.dataset} (columns: {columns}); "
                            "name it with --image-column NAME")
        image = (typed + named)[0]
    if cfg.label_column == "none":
        return image, None
    if cfg.label_column is not None:
        if cfg.label_column not in features:
            raise UserError(f"label column '{cfg.label_column}' not found in {cfg.dataset} (columns: {columns}); "
                            "pass one with --label-column NAME, or --label-column none for no labels")
        return image, cfg.label_column
    typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel) and c != image]
    named = [c for c in ("label", "labels", "class") if c in features and c != image]
    return image, (typed + named or [None])[0]


def _hub_labels(ds: Any, column: str, name: str) -> tuple[list[int], list[str]]:
    """Class ids and names: a ClassLabel's own, or sorted unique values for plain columns."""
    import datasets

    values = list(ds[column])
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        if any(v < 0 for v in values):
            raise UserError(f"label column '{column}' of {name} has unlabelled rows (-1); "
                            "pick another split, or pass --label-column none to train without labels")
        return values, list(feature.names)
    if any(v is None or isinstance(v, (float, list, dict)) for v in values):
        raise UserError(f"label column '{column}' of {name} does not hold one class per row; "
                        "pass another with --label-column NAME, or --label-column none")
    names = sorted(set(values))
    ids = {v: i for i, v in enumerate(names)}
    return [ids[v] for v in values], [str(v) for v in names]


def _warn_dropped_classes(labels: list[int] | None, label_names: list[str] | None, max_images: int) -> None:
    if labels is not None and label_names is not None and len(set(labels)) < len(label_names):
        logger.warning("max_images=%d keeps only %d of %d classes (it takes the first images in order)",
                       max_images, len(set(labels)), len(label_names))


# ---------------------------------------------------------------- decoding


def _decode_all(
    sources: Iterable[Any], labels: list[int] | None, resolution: int, what: str
) -> tuple[list[np.ndarray], list[int] | None]:
    """Decode every source on a thread pool (PIL releases the GIL); skip and count failures.

    Sources are consumed in chunks so that a large Hub split is never held encoded in memory.
    """
    def attempt(item: tuple[int, Any]) -> tuple[np.ndarray, str | None] | str:
        """The image and, if it has several frames, its name; or why it did not decode."""
        i, source = item
        name = printable(source) if isinstance(source, Path) else f"row {i}"
        try:
            image, frames = _decode_image(source, resolution)
        except Exception as err:  # noqa: BLE001 - a file that fails to decode for any reason is skipped, not fatal
            return f"{name}: {why_unreadable(err, source if isinstance(source, Path) else None)}"
        return image, name if frames else None

    results: list[tuple[np.ndarray, str | None] | str] = []
    items = enumerate(sources)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        while chunk := list(itertools.islice(items, 1024)):
            results += pool.map(attempt, chunk)
    if not results:
        raise UserError(f"{what} holds no images; check the split, or point --dataset at other data")
    failures = [r for r in results if isinstance(r, str)]
    if len(failures) == len(results):
        raise UserError(f"none of the {len(results)} images in {what} could be decoded (e.g. {failures[0]}); "
                        "check that the files are valid PNG/JPEG/WebP images")
    if failures:
        logger.warning("skipped %d of %d images in %s that could not be decoded (e.g. %s)",
                       len(failures), len(results), what, failures[0])
    kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
    several_frames = [results[i][1] for i in kept if results[i][1]]
    if several_frames:
        logger.warning("%s", first_frame_note(several_frames))
    return [results[i][0] for i in kept], None if labels is None else [labels[i] for i in kept]


def _decode_image(source: Any, resolution: int) -> tuple[np.ndarray, bool]:
    """One image as uint8 H x W (grayscale) or H x W x 3, its shorter side resized to `resolution`, and
    whether it had more frames than the first, which is the one used."""
    with _open(source) as img:
        frames = several_frames(img)
        img.seek(0)
        img.draft(None, (resolution, resolution))  # JPEG: decode at a reduced scale when that is enough
        ImageOps.exif_transpose(img, in_place=True)
        img = rgb_or_gray(img)
        width, height = img.size
        if not width or not height:
            raise ValueError("image has no pixels")
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or math.inf):  # a strip 1 pixel high, say
            raise ValueError(f"it is {width}x{height}, which scaled to a shorter side of {resolution} px would have "
                             f"more than {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's limit); crop it")
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return np.array(img), frames


def _open(source: Any) -> Image.Image:
    """A PIL image from a path, bytes, an undecoded `datasets.Image` value, a PIL image or an array."""
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return open_image(io.BytesIO(source["bytes"]))
        import datasets  # a path or URL that only datasets knows how to open

        return datasets.Image().decode_example(source)
    if isinstance(source, (str, Path)):
        return open_image(source)
    if isinstance(source, bytes):
        return open_image(io.BytesIO(source))
    if isinstance(source, Image.Image):
        return source
    array = np.asarray(source)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels-first arrays
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:  # floats in [0, 1] are scaled; anything else is taken as 0-255
        scale = 255.0 if array.dtype.kind == "f" and array.max() <= 1.0 else 1.0
        array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def rgb_or_gray(img: Image.Image) -> Image.Image:
    """Mode RGB or L: 16-bit scaled (not clipped, as PIL does), alpha composited onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        array = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or array.max() > 255:
            array = array / 257
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    gray = img.mode in ("1", "L", "LA", "La")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("L" if gray else "RGB")


def _assemble(
    arrays: list[np.ndarray], labels: list[int] | None, label_names: list[str] | None, channels: int | None,
    what: str,
) -> ImageData:
    """Stack decoded arrays when they share a size; grayscale stays 1 channel only if all are."""
    target = channels or (1 if all(a.ndim == 2 for a in arrays) else 3)
    tensors = [
        _to_channels(torch.from_numpy(a)[None] if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1), target)
        .contiguous()
        for a in arrays
    ]
    same_size = len({t.shape for t in tensors}) == 1
    return ImageData(
        images=torch.stack(tensors) if same_size else tensors,
        labels=None if labels is None else torch.tensor(labels, dtype=torch.long),
        label_names=None if labels is None else label_names,
        channels=target,
        source=f"{what} ({len(tensors)} images)",
    )


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 images (channel dim at -3) to 1 channel (luma) or 3 (replicated gray)."""
    have = images.shape[-3]
    if have == channels:
        return images
    if channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    weights = torch.tensor(_LUMA, dtype=torch.int32).view(3, 1, 1)
    luma = ((images.to(torch.int32) * weights).sum(-3, keepdim=True) + 500) // 1000
    return luma.to(torch.uint8)


# ---------------------------------------------------------------- disk cache


def default_cache_dir() -> Path:
    env = os.environ.get("DIFFTOOL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difftool" / "data"


def _cached(cache: Path, key: dict, label: str, build: Callable[[], ImageData]) -> ImageData:
    """Return the data cached under a hash of `key`, or build it and write it atomically."""
    digest = hashlib.sha256(json.dumps({**key, "format": _CACHE_FORMAT}, sort_keys=True).encode()).hexdigest()
    name = re.sub(r"[^\w.-]+", "_", label)
    path = cache / f"{name}-{digest[:16]}.safetensors"
    if path.is_file():
        try:
            data = _read_cache(path)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, err)
        else:
            logger.info("loaded %s from cache %s", data.source, path)
            return data
    data = build()
    try:
        _write_cache(path, data)
    except OSError as err:
        logger.warning("could not write data cache %s (%s); the data will be decoded again next time", path, err)
    return data


def _write_cache(path: Path, data: ImageData) -> None:
    if isinstance(data.images, torch.Tensor):
        tensors = {"images": data.images}
    else:
        tensors = {f"image.{i}": t for i, t in enumerate(data.images)}
    if data.labels is not None:
        tensors["labels"] = data.labels
    metadata = {
        "source": data.source,
        "channels": str(data.channels),
        "count": str(len(data)),
        "label_names": json.dumps(data.label_names),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: Path) -> ImageData:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        count = int(meta["count"])
        keys = set(f.keys())
        if "images" in keys:
            images: torch.Tensor | list[torch.Tensor] = f.get_tensor("images")
        else:
            images = [f.get_tensor(f"image.{i}") for i in range(count)]
        labels = f.get_tensor("labels") if "labels" in keys else None
    if len(images) != count:
        raise ValueError(f"holds {len(images)} images, expected {count}")
    return ImageData(
        images=images,
        labels=labels,
        label_names=json.loads(meta["label_names"]),
        channels=int(meta["channels"]),
        source=meta["source"],
    )
