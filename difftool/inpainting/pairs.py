"""Image and mask files for `difftool inpaint`: finding the pairs, and one pair as the model takes it.

Masks are white where to generate and black where to keep (`invert` swaps that). The model sees
the image squashed (or, with `crop`, centre-cropped) to its resolution R x R; `difftool.inpainting.paste`
puts its result back into the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difftool.errors import UserError
from difftool.images import (
    eight_bit_values,
    from_pil,
    high_bit,
    images_by_stem,
    printable,
    read_image,
    rgb_or_gray,
    why_unreadable,
)

_ASPECT_TOLERANCE = 0.01  # a mask this close to the image's aspect ratio is resized to fit it


@dataclass
class Pair:
    """One image and its mask as the model takes them, plus what `paste_back` needs to undo that."""

    name: str  # stem of the image file, for output names
    image: torch.Tensor  # float32 C x R x R in [-1, 1], the model's channels
    mask: torch.Tensor  # float32 1 x R x R, 1 = generate, 0 = keep (after invert and grow)
    original: Image.Image  # the decoded image, mode RGB, RGBA or L
    notes: list[str]  # conversions and resizes made, to print once
    box: tuple[int, int, int, int]  # (left, top, right, bottom): the part of `original` the model sees
    several_frames: list[str] = field(default_factory=list)  # the files (image, mask) read by their first frame

    @property
    def coverage(self) -> float:
        """Fraction of model pixels to generate: 0.0 means nothing to do, 1.0 is plain sampling."""
        return float(self.mask.mean())

    def weight(self) -> Image.Image:
        """How much of each pixel of `original` comes from the model (L: 0 = kept exactly, 255 = generated).

        The binary model mask resized bilinearly to the box, which gives a soft seam; 0 outside the box.
        """
        left, top, right, bottom = self.box
        mask = Image.fromarray((self.mask[0] * 255).to(torch.uint8).numpy())
        weight = Image.new("L", self.original.size, 0)
        weight.paste(mask.resize((right - left, bottom - top), Image.Resampling.BILINEAR), (left, top))
        return weight


def load_pair(image_path: Path, mask_path: Path, *, resolution: int, channels: int, crop: bool = False,
              invert: bool = False, grow: int = 0) -> Pair:
    """Decode an image and its mask and bring both to the model's resolution and channels.

    Any mask mode works: colour is taken as luminance, and alpha composites it over black (opaque
    white = generate, transparent = keep); values are then split at half brightness. An all-black
    or all-white mask is not an error: `Pair.coverage` is 0.0 or 1.0 and the caller decides.
    """
    if grow < 0:
        raise UserError(f"grow must be 0 or more pixels, got {grow}")
    image_path, mask_path = Path(image_path), Path(mask_path)
    (image, image_frames), (mask_image, mask_frames) = _open(image_path, "image"), _open(mask_path, "mask")
    original, notes = _usable_mode(image)
    values, mask_notes = _fit_mask(_mask_values(mask_image), mask_path, original.size)
    generate = (1 - values if invert else values) >= 0.5
    box = _centre_square(original.size) if crop else (0, 0, *original.size)
    notes += mask_notes + _geometry_notes(original.size, box, resolution) + _channel_notes(original.mode, channels)
    outside = generate.sum() - _within(generate, box).sum()
    if outside:
        notes.append(f"{outside / generate.sum():.1%} of the mask {mask_path.name} lies outside the centre crop "
                     "and is kept")
    model_view = original.crop(box).convert("L" if channels == 1 else "RGB")
    if model_view.size != (resolution, resolution):
        # Lanczos, as training images are resized in difftool.data: the model sees what it learned from.
        model_view = model_view.resize((resolution, resolution), Image.Resampling.LANCZOS)
    # A model pixel is generated if any pixel it covers is, so thin strokes survive downscaling.
    mask = F.adaptive_max_pool2d(torch.from_numpy(_within(generate, box)).float()[None, None], resolution)
    if grow:
        mask = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)
    return Pair(
        name=image_path.stem,
        image=from_pil(model_view).float().div_(127.5).sub_(1.0),
        mask=mask[0],
        original=original,
        notes=notes,
        box=box,
        several_frames=[printable(p) for p, frames in ((image_path, image_frames), (mask_path, mask_frames)) if frames],
    )


def find_pairs(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) files of two folders matched by name without extension, in name order."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    if mask_dir.is_file():
        raise UserError(f"{image_dir} is a folder of images, so give a folder of masks named like them, "
                        f"not the single file {mask_dir}")
    images, masks = _by_stem(image_dir, "images"), _by_stem(mask_dir, "masks")
    unmasked, unused = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if unmasked or unused:
        problems = [f"{len(names)} {what} ({_some(names, found)})"
                    for names, found, what in ((unmasked, images, f"images in {image_dir} have no mask"),
                                               (unused, masks, f"masks in {mask_dir} have no image")) if names]
        raise UserError(f"{' and '.join(problems)}; masks are matched to images by file name without extension, "
                        "so rename or remove those files")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"folder of {what} not found: {folder}; check the path")
    return images_by_stem(folder, what)


def _some(stems: list[str], files: dict[str, Path]) -> str:
    """Up to three file names, and how many more."""
    shown = ", ".join(files[s].name for s in stems[:3])
    return shown + (f" and {len(stems) - 3} more" if len(stems) > 3 else "")


def _open(path: Path, what: str) -> tuple[Image.Image, bool]:
    """Decode the whole file now, so that a bad file stops the run before any sampling, by name;
    also whether it has frames after the first, which are not used."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise UserError(f"{what} {printable(path)} {problem}; give the path of an image file")
    try:
        return read_image(path)
    except Exception as err:  # Pillow's decoders fail on hostile bytes in many ways
        remedy = "downscale it" if isinstance(err, Image.DecompressionBombError) else "re-save it as PNG or JPEG"
        raise UserError(f"cannot read {what} {printable(path)}: {why_unreadable(err, path)}; {remedy}") from err


def _usable_mode(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Mode RGB, RGBA or L; anything else is converted, with a note (16-bit is scaled, not clipped)."""
    if img.mode in ("RGB", "RGBA", "L"):
        return img, []
    if high_bit(img):
        converted = rgb_or_gray(img)
    else:
        converted = img.convert("L" if img.mode == "1" else "RGBA" if img.has_transparency_data else "RGB")
    return converted, [f"images of mode {img.mode} are converted to 8-bit {converted.mode}"]


def _mask_values(img: Image.Image) -> np.ndarray:
    """float32 H x W in [0, 1]: luminance, times alpha where the mask has any transparency."""
    if high_bit(img):
        return (eight_bit_values(img) / 255).astype(np.float32)
    if not img.has_transparency_data:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255
    rgba = img.convert("RGBA")
    return np.asarray(rgba.convert("L"), dtype=np.float32) * np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255**2


def _fit_mask(values: np.ndarray, mask_path: Path, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """The mask values at the image's size: resized if only the scale differs, else an error."""
    (height, width), (image_width, image_height) = values.shape, size
    if (width, height) == size:
        return values, []
    if abs(width * image_height - image_width * height) > _ASPECT_TOLERANCE * image_width * height:
        raise UserError(f"mask {mask_path} is {width}x{height} but its image is {image_width}x{image_height}, "
                        "another shape; give a mask of the image's size")
    resized = Image.fromarray(values).resize(size, Image.Resampling.BILINEAR)
    note = f"the mask {mask_path.name} ({width}x{height}) is resized to its image's {image_width}x{image_height}"
    return np.asarray(resized), [note]


def _centre_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _within(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return array[top:bottom, left:right]


def _geometry_notes(size: tuple[int, int], box: tuple[int, int, int, int], resolution: int) -> list[str]:
    width, height = box[2] - box[0], box[3] - box[1]
    steps = []
    if (width, height) != size:
        steps.append(f"centre-cropped to {width}x{height} (the rest is kept as it is)")
    if width != height:
        steps.append(f"squashed to the model's {resolution}x{resolution} (--crop keeps the aspect ratio)")
    elif width != resolution:
        steps.append(f"resized to the model's {resolution}x{resolution}")
    if not steps:
        return []
    return [f"images of {size[0]}x{size[1]} are {', then '.join(steps)}, and the results resized back"]


def _channel_notes(mode: str, channels: int) -> list[str]:
    if channels == 1 and mode != "L":
        return ["the model is grayscale: in colour images the region it fills is gray (the rest keeps its colour)"]
    if channels == 3 and mode == "L":
        return ["the model is RGB: grayscale images are given to it as RGB and its results turned back into gray"]
    return []
