"""Putting an inpainting result back: into the original file's pixels, and as a side-by-side comparison.

`paste_back` resizes the model's result to the region it came from and blends it into the original, so
whatever the mask keeps is the original bit for bit, at the original size.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from difftool.images import from_pil, make_grid, to_pil
from difftool.inpainting.pairs import Pair

_STRIP_HEIGHT = (128, 512)  # comparison images are scaled to a height in this range


def paste_back(pair: Pair, result: torch.Tensor) -> Image.Image:
    """Blend a uint8 C x R x R model result into the original image: same size and mode, alpha untouched.

    Bicubic, not bilinear, to resize the result: results are mostly enlarged (small models, larger
    photos), where it is sharper; PIL clips its overshoot to 0-255.
    """
    left, top, right, bottom = pair.box
    generated = to_pil(result).convert("L" if pair.original.mode == "L" else "RGB")
    generated = generated.resize((right - left, bottom - top), Image.Resampling.BICUBIC)
    if pair.original.mode == "RGBA":
        generated.putalpha(pair.original.getchannel("A").crop(pair.box))
    filled = pair.original.copy()
    filled.paste(generated, pair.box, pair.weight().crop(pair.box))
    return filled


def comparison(pair: Pair, filled: Image.Image) -> Image.Image:
    """Input | mask (white = generated, gray = blended seam) | result, between white separators.

    Scaled to a height of 128-512 px so that tiny and huge images are both easy to look at;
    small ones are enlarged by a whole factor with nearest-neighbour, to show their pixels.
    """
    width, height = pair.original.size
    low, high = _STRIP_HEIGHT
    if height > high:
        size, resample = (max(1, round(width * high / height)), high), Image.Resampling.LANCZOS
    else:
        factor = math.ceil(low / height) if height < low else 1
        size, resample = (width * factor, height * factor), Image.Resampling.NEAREST
    mode = "L" if pair.original.mode == "L" else "RGB"
    panels = [_on_white(p).convert(mode).resize(size, resample) for p in (pair.original, pair.weight(), filled)]
    return to_pil(make_grid(torch.stack([from_pil(p) for p in panels]), ncol=3))


def _on_white(img: Image.Image) -> Image.Image:
    """RGBA shown over white, as transparent pixels look in most viewers; other modes as they are."""
    if img.mode != "RGBA":
        return img
    return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
