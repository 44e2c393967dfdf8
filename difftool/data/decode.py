"""Decoding: any image source -> uint8 C x H x W at the loading resolution, gray or RGB, assembled into ImageData."""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difftool.errors import UserError
from difftool.images import first_frame_note, open_image, printable, rgb_or_gray, upright_first_frame, why_unreadable

logger = logging.getLogger("difftool")


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
    with _open(source) as opened:
        img, frames = upright_first_frame(opened, draft=(resolution, resolution))
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


def training_view(path, resolution: int, channels: int) -> torch.Tensor:
    """One image file as training sees it: its shorter side resized to `resolution` (Lanczos), the model's
    `channels`, the centre square (uint8 C×R×R). For commands that start from the user's own image: a file that
    does not decode is one error naming it."""
    try:
        array, _ = _decode_image(path, resolution)
    except Exception as err:  # Pillow's decoders fail on hostile bytes in many ways
        raise UserError(f"cannot read image {printable(path)}: {why_unreadable(err, path)}; "
                        "re-save it as PNG or JPEG") from err
    image = torch.from_numpy(array)
    image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    image = _to_channels(image, channels)
    height, width = image.shape[-2:]
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return image[:, top : top + resolution, left : left + resolution].contiguous()
