"""Image files: finding them, decoding untrusted ones safely (the one decoder every reader uses), grids and captioned
strips, and PNGs (settings in text metadata) and animations (settings in EXIF), written atomically."""

from __future__ import annotations

import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from difftool.errors import UserError, first_line
from difftool.safeio import atomic_path

_OPEN_LOCK = threading.Lock()
LOOK_SIZE = 64  # tiles smaller than this are enlarged (nearest-neighbour) to be looked at
_EXIF_DESCRIPTION = 0x010E  # ImageDescription: where an animation keeps its settings, as JSON

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


def images_by_stem(folder: Path, what: str = "images") -> dict[str, Path]:
    """The images directly in `folder` by file name without extension, which outputs and image-mask pairs go by: two
    with one name (a.jpg, a.png) are refused, as is a folder without any."""
    found: dict[str, Path] = {}
    for path in image_files(folder, recursive=False):
        if path.stem in found:
            raise UserError(f"{printable(found[path.stem])} and {printable(path.name)} have the same name; keep one of "
                            "them (outputs and masks go by the file name without its extension)")
        found[path.stem] = path
    if not found:
        raise UserError(f"no {what} found in {printable(folder)} (looked for {'/'.join(IMAGE_SUFFIXES)}); "
                        f"point it at a folder of {what}")
    return found


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


def read_image(path) -> tuple[Image.Image, bool]:
    """The first frame of an image file, decoded now (so a bad file fails here) and upright, and whether the file
    has more frames, which difftool does not use."""
    with open_image(path) as img:
        return upright_first_frame(img)


def upright_first_frame(img: Image.Image, draft: tuple[int, int] | None = None) -> tuple[Image.Image, bool]:
    """The first frame of an opened image, decoded and turned per its EXIF orientation (as viewers show camera
    photos and as masks are drawn over them), and whether it has more frames.

    `draft`: a JPEG may be decoded at a reduced scale that still covers this size (much faster for photos).
    """
    frames = several_frames(img)
    img.seek(0)
    if draft is not None:
        img.draft(None, draft)
    img.load()
    return ImageOps.exif_transpose(img), frames


def rgb_or_gray(img: Image.Image) -> Image.Image:
    """Mode RGB or L: 16-bit and float scaled to 8 bits (not clipped, as PIL does), alpha composited onto white."""
    if high_bit(img):
        return Image.fromarray(np.rint(eight_bit_values(img)).astype(np.uint8))
    gray = img.mode in ("1", "L", "LA", "La")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("L" if gray else "RGB")


def high_bit(img: Image.Image) -> bool:
    """A gray image of more than 8 bits a pixel (16-bit PNG and TIFF, 32-bit integer or float)."""
    return img.mode in ("I", "F") or img.mode.startswith("I;16")


def eight_bit_values(img: Image.Image) -> np.ndarray:
    """A `high_bit` image's pixels as float64 in [0, 255]: the 16-bit range if the mode says so or a value
    exceeds 255, else taken as 8-bit values already."""
    array = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or array.max() > 255:
        array = array / 257
    return np.clip(array, 0, 255)


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


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL L or RGB -> uint8 C×H×W."""
    array = torch.from_numpy(np.array(img))
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


def save_png(image: torch.Tensor | Image.Image, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a PNG atomically; `metadata` goes into tEXt chunks (readable with PIL's `.text`)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, printable(value))
    with atomic_path(Path(path)) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)


def look_factor(size: int) -> int:
    """The whole factor that enlarges a tile of `size` px to at least LOOK_SIZE px."""
    return max(1, LOOK_SIZE // size)


def captioned_grid(tiles: torch.Tensor, ncol: int, captions: list[str], row_names: list[str]) -> Image.Image:
    """uint8 N×C×H×W tiles in rows of `ncol`, enlarged to be looked at, a caption under each column and a name left
    of each row (RGB, white margins): a strip that explains itself, e.g. one row per quantity, one column per step."""
    factor = look_factor(tiles.shape[-1])
    grid = to_pil(make_grid(enlarge(tiles, factor), ncol=ncol)).convert("RGB")
    font = _font()
    left = max((_text_width(font, name) for name in row_names), default=0) + 8
    line = _text_height(font) + 6
    canvas = Image.new("RGB", (left + grid.width, grid.height + line), "white")
    canvas.paste(grid, (left, 0))
    draw = ImageDraw.Draw(canvas)
    cell = tiles.shape[-1] * factor + 2  # make_grid's pad is 2
    for row, name in enumerate(row_names):
        draw.text((4, 2 + row * cell + cell // 2), name, fill="black", font=font, anchor="lm")
    for col, caption in enumerate(captions):
        draw.text((left + 2 + col * cell + cell // 2, grid.height + 2), caption, fill="black", font=font, anchor="ma")
    return canvas


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType: its bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _text_height(font) -> int:
    _, top, _, bottom = font.getbbox("t=0123456789")
    return int(bottom - top)


def save_animation(frames: torch.Tensor, path: Path, metadata: dict[str, object], *, frame_ms: int = 120,
                   hold_ms: int = 1200) -> None:
    """uint8 F×C×H×W frames as a lossless animated WebP, written atomically (the last frame held `hold_ms`):
    lossless, so a frame equals the image it shows bit for bit. `metadata` goes into EXIF ImageDescription as JSON
    (`animation_metadata` reads it back)."""
    pictures = [to_pil(frame) for frame in frames]
    exif = Image.Exif()
    exif[_EXIF_DESCRIPTION] = printable(json.dumps(metadata))
    durations = [frame_ms] * (len(pictures) - 1) + [hold_ms]
    with atomic_path(Path(path)) as tmp:
        pictures[0].save(tmp, format="WEBP", save_all=True, append_images=pictures[1:], duration=durations, loop=0,
                         lossless=True, exif=exif.tobytes())


def animation_metadata(img: Image.Image) -> dict:
    """The settings `save_animation` wrote into an animation."""
    return json.loads(img.getexif().get(_EXIF_DESCRIPTION, "{}"))
