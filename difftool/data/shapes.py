"""The built-in `shapes` data set: seeded, rendered in torch, never cached."""

from __future__ import annotations

import math

import torch

from difftool.data.decode import ImageData, _to_channels
from difftool.data.decode import _LUMA



SHAPE_NAMES = ["circle", "square", "triangle", "ring", "cross"]


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
