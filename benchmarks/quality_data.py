"""Data sets the recipes were not tuned on, written as class folders of PNGs (what a user points `--dataset` at).

- `dark-shapes`: four rotated shapes (circle, square, triangle, cross) in saturated colours on dark,
  slightly tinted backgrounds (mean pixel about 50 of 255).
- `light-shapes`: the same four shapes, filled with stripes, checks or flat colour, on near-white
  backgrounds (mean pixel about 200).
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, upscaled (bilinear) and grey on black: a
  real data set that ships inside a PyPI wheel.
- `shapes`: difftool's own built-in data set (the quickstart's), the one the recipes were tuned on: the
  check that a change for the sets above does not cost the data users start with.

Every image comes from a generator seeded by (set, index), so the sets are the same on every machine.
"""

from __future__ import annotations

import colorsys
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SETS = ("dark-shapes", "light-shapes", "digits", "shapes")
NEEDS = {"digits": "sklearn"}  # the module a set's data comes from, where it is not numpy
SHAPES = ("circle", "square", "triangle", "cross")
_SUPERSAMPLE = 4  # render at 4x and average: anti-aliased edges at any rotation


def missing_module(names: list[str]) -> str | None:
    """The error to stop on before any training, where a set's module is not installed."""
    for name in names:
        if name not in SETS:
            return f"unknown set '{name}': choose from {', '.join(SETS)}"
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            return f"the {name} set needs scikit-learn: pip install -e '.[bench]'"
    return None


def write_set(name: str, root: Path, *, resolution: int, num_images: int) -> Path:
    """Write set `name` under root/NAME-RES[-COUNT]/<class>/NNNNN.png once; returns that folder.

    The count is in the name (digits has its own 1,797): a folder, and the runs the benchmark trains
    on it, are reused only for the same images.
    """
    folder = root / (f"{name}-{resolution}" if name == "digits" else f"{name}-{resolution}-{num_images}")
    done = folder / ".complete"
    if done.exists():
        return folder
    images, labels, classes = make_set(name, resolution=resolution, num_images=num_images)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / classes[label] / f"{i:05d}.png")
    done.write_text(f"{len(images)}\n")
    return folder


def make_set(name: str, *, resolution: int, num_images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 N x H x W x C images, int labels, class names) of one benchmark set."""
    if name == "digits":
        return _digits(resolution)
    if name == "shapes":
        from difftool.training.data.shapes import make_shapes

        data = make_shapes(num_images, resolution)
        return data.images.permute(0, 2, 3, 1).numpy(), data.labels.numpy(), list(data.label_names)
    if name not in SETS:
        raise ValueError(f"unknown set {name}; choose from {', '.join(SETS)}")
    light = name == "light-shapes"
    rng = np.random.default_rng(SETS.index(name) * 7919 + 17)
    images = np.empty((num_images, resolution, resolution, 3), np.uint8)
    labels = np.arange(num_images) % len(SHAPES)
    for i in range(num_images):
        images[i] = _render(SHAPES[labels[i]], resolution, rng, light=light)
    return images, labels, list(SHAPES)


def _render(kind: str, resolution: int, rng: np.random.Generator, *, light: bool) -> np.ndarray:
    size = resolution * _SUPERSAMPLE
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    radius = rng.uniform(0.5, 0.8)
    cx, cy = rng.uniform(-0.9 + radius * 0.8, 0.9 - radius * 0.8, 2)
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * (x - cx) + np.sin(angle) * (y - cy)
    v = -np.sin(angle) * (x - cx) + np.cos(angle) * (y - cy)
    if kind == "circle":
        inside = u**2 + v**2 < (radius * 0.85) ** 2
    elif kind in ("square", "triangle"):
        sides = 4 if kind == "square" else 3
        inside = np.ones_like(u, bool)
        for k in range(sides):
            normal = np.pi / 2 + 2 * np.pi * k / sides + np.pi / sides
            inside &= u * np.cos(normal) + v * np.sin(normal) < radius * np.cos(np.pi / sides)
    else:
        arm = radius * 0.28
        inside = ((np.abs(u) < arm) & (np.abs(v) < radius)) | ((np.abs(v) < arm) & (np.abs(u) < radius))
    hue = rng.uniform()
    if light:
        background = rng.uniform(215, 250, 3)
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.85))) * 255
        texture = rng.integers(3)  # flat, stripes, checks
        period = rng.uniform(0.25, 0.45)
        if texture == 1:
            shade = np.where(np.sin(u / period * np.pi) > 0, 1.0, 0.55)
        elif texture == 2:
            shade = np.where(np.sin(u / period * np.pi) * np.sin(v / period * np.pi) > 0, 1.0, 0.55)
        else:
            shade = np.ones_like(u)
    else:
        background = rng.uniform(10, 50, 3)
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))) * 255
        shade = np.ones_like(u)
    pixels = np.where(inside[..., None], fg * shade[..., None], background)
    pixels = pixels.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return pixels.round().clip(0, 255).astype(np.uint8)


def _digits(resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits  # ships its data inside the wheel: no download

    digits = load_digits()
    small = (digits.images / 16 * 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in small])
    return images[..., None], digits.target.astype(np.int64), [str(d) for d in range(10)]
