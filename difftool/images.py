"""Image files: opening untrusted ones safely; grids and PNGs with their settings in text metadata, written atomically."""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from difftool.errors import first_line
from difftool.safeio import atomic_path

_OPEN_LOCK = threading.Lock()

# The one list of image files every command reads: training folders, evaluated folders, inpainting's images and masks.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def visible_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """The files in `root` (and below it), sorted; hidden files and folders are skipped: macOS "._x.jpg" files
    are not images."""
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and p.is_file())


def image_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """The image files among `visible_files(root)`, by suffix."""
    return [p for p in visible_files(root, recursive=recursive) if p.suffix.lower() in IMAGE_SUFFIXES]


def open_image(source) -> Image.Image:
    """`Image.open` (lazy: reads the header only) that refuses any image over `Image.MAX_IMAGE_PIXELS`.

    Pillow raises only beyond twice its limit and merely warns in between, after which the caller
    would decode the image all the same. Here the warning is the error. Warning filters are global
    to the process, so they are set under a lock: files are opened on several threads.
    """
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise Image.DecompressionBombError(
            f"it has more than {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS) and "
            f"could be a decompression bomb, so it is not decoded") from err


def several_frames(img: Image.Image) -> bool:
    """True for an animated GIF, PNG or WebP, or a multi-page TIFF: difftool reads only its first frame.

    A JPEG with a preview or depth image (MPO) is not counted: its first image is the photo itself.
    """
    try:
        return img.format != "MPO" and bool(getattr(img, "is_animated", False))
    except Exception:  # noqa: BLE001 - a damaged later frame: decoding the first says whether the file is usable
        return False


def first_frame_note(names: list[str]) -> str:
    """The one note a command gives on the files of which only the first frame was used."""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return (f"{names[0]}{more} {'have' if more else 'has'} several frames (animated or multi-page); only the first "
            f"frame is used")


def why_unreadable(err: Exception, path: Path | None = None) -> str:
    """One line on why an image did not decode, without the file name that Pillow's messages repeat."""
    if path is not None and path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can read"
    return printable(first_line(err))


def printable(text) -> str:
    """`str(text)` with the bytes of file names that are not UTF-8 written as escapes (\\udcff).

    Python keeps such bytes as lone surrogates, which PNG text chunks, safetensors metadata and strict
    streams refuse with UnicodeEncodeError.
    """
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def make_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 N×C×H×W -> one C×H'×W' image, white padding between tiles."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor, so small samples can be looked at."""
    return image.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) if factor > 1 else image


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 C×H×W (C = 1 or 3) -> PIL image."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")


def save_png(image: torch.Tensor | Image.Image, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a PNG atomically; `metadata` goes into tEXt chunks (readable with PIL's `.text`)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, printable(value))
    with atomic_path(Path(path)) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)
