"""Hugging Face Hub data sets and their short aliases (mnist, cifar10, ...), decoded once and cached."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from difftool.errors import UserError, first_line
from difftool.data.cache import _cached
from difftool.data.decode import ImageData, _assemble, _decode_all

logger = logging.getLogger("difftool")


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


def load_hub(cfg: Any, cache: Path) -> ImageData:
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
