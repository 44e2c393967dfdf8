"""The on-disk cache of decoded folders and Hub data sets (safetensors, keyed by what decoding depends on)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from difftool.data.decode import ImageData

logger = logging.getLogger("difftool")


# Bump when decoding or resizing changes, so that old cache files are no longer hit.
_CACHE_FORMAT = 1


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
