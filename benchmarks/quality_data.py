"""Data sets the recipes were not tuned on, written as class folders of PNGs (what a user points `--dataset` at).

- `dark-shapes`: four rotated shapes (circle, square, triangle, cross) in saturated colours on dark,
  slightly tinted backgrounds (mean pixel about 50 of 255).
- `light-shapes`: the same four shapes, filled with stripes, checks or flat colour, on near-white
  backgrounds (mean pixel about 200).
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, upscaled (bilinear) and grey on black: a
  real data set that ships inside a PyPI wheel.
- `letters`: ten capital letters (A, B, E, G, K, M, Q, R, S, W), one class each, in the 22 text fonts
  that ship inside matplotlib's wheel (3.11: DejaVu Sans, Sans Mono and Serif and STIXGeneral, each
  regular, bold, italic and bold italic; Computer Modern's cmb10, cmmi10, cmr10, cmss10, cmti10 and
  cmtt10; not the symbol fonts). Letter height 55-85% of the image (less where a wide letter would not
  fit), turned up to 15 degrees either way, placed anywhere it stays whole. The background is a
  linear gradient between two colours in any direction; the letter is one colour or a gradient of its
  own, at least 80 levels of luma away from every background pixel (one dark, the other light).
  12,000 images of 32 px take about 11 s on one core. The glyphs are drawn by the installed Pillow
  (FreeType) from the installed matplotlib's files: another version of either may move an edge by
  a level, or change the font list.
- `sizes`: the four shapes of `dark-shapes` at any size, log-uniform from a radius of 6% of the image to 40%
  (at 32 px a shape can be 3 pixels across), anywhere it stays whole, at any rotation: small objects, where the
  samplers' ranking flipped.
- `photos`: crops of eight of scikit-image's sample photographs (astronaut, coffee, chelsea, rocket,
  hubble_deep_field, immunohistochemistry, retina, grass), one class each: a square of a quarter to half the
  photo's shorter side at any place, shrunk to the resolution (Lanczos). Real photographs that ship inside a
  PyPI wheel.
- `shapes`: difftool's own built-in data set (the quickstart's), the one the recipes were tuned on: the
  check that a change for the sets above does not cost the data users start with.

Every image comes from a generator seeded by (set, index), so the sets are the same on every machine.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import string
from pathlib import Path

import numpy as np
from PIL import Image

SETS = ("dark-shapes", "light-shapes", "digits", "letters", "sizes", "photos", "shapes")
# the module a set's data comes from, where it is not numpy or a core dependency (letters: matplotlib's fonts)
NEEDS = {"digits": "sklearn", "photos": "skimage"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "grass")
SHAPES = ("circle", "square", "triangle", "cross")
LETTERS = ("A", "B", "E", "G", "K", "M", "Q", "R", "S", "W")
_MIN_LUMA_GAP = 80  # levels of 255 between a letter's luma and its background's, everywhere
_SUPERSAMPLE = 4  # render at 4x and average: anti-aliased edges at any rotation


def missing_module(names: list[str]) -> str | None:
    """The error to stop on before any training, where a set's module is not installed."""
    for name in names:
        if name not in SETS:
            return f"unknown set '{name}': choose from {', '.join(SETS)}"
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            package = {"sklearn": "scikit-learn", "skimage": "scikit-image"}[NEEDS[name]]
            return f"the {name} set needs {package}: pip install -e '.[bench]'"
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
    if name == "letters":
        return _letters(resolution, num_images)
    if name == "photos":
        return _photos(resolution, num_images)
    if name == "shapes":
        from difftool.data.shapes import make_shapes

        data = make_shapes(num_images, resolution)
        return data.images.permute(0, 2, 3, 1).numpy(), data.labels.numpy(), list(data.label_names)
    if name not in SETS:
        raise ValueError(f"unknown set {name}; choose from {', '.join(SETS)}")
    light = name == "light-shapes"
    rng = np.random.default_rng(SETS.index(name) * 7919 + 17)
    images = np.empty((num_images, resolution, resolution, 3), np.uint8)
    labels = np.arange(num_images) % len(SHAPES)
    for i in range(num_images):
        radius = float(np.exp(rng.uniform(np.log(0.12), np.log(0.8)))) if name == "sizes" else rng.uniform(0.5, 0.8)
        images[i] = _render(SHAPES[labels[i]], resolution, rng, light=light, radius=radius)
    return images, labels, list(SHAPES)


def _render(kind: str, resolution: int, rng: np.random.Generator, *, light: bool, radius: float) -> np.ndarray:
    size = resolution * _SUPERSAMPLE
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
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


def _photos(resolution: int, num_images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from skimage import data

    rng = np.random.default_rng(SETS.index("photos") * 7919 + 17)
    photos = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        photos.append(Image.fromarray(photo).convert("RGB"))
    images = np.empty((num_images, resolution, resolution, 3), np.uint8)
    labels = np.arange(num_images) % len(PHOTOS)
    for i in range(num_images):
        photo = photos[labels[i]]
        side = int(min(photo.size) * rng.uniform(0.25, 0.5))
        left, top = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        crop = photo.crop((left, top, left + side, top + side))
        images[i] = np.asarray(crop.resize((resolution, resolution), Image.LANCZOS))
    return images, labels, list(PHOTOS)


def _letters(resolution: int, num_images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    fonts = letter_fonts()
    images = np.empty((num_images, resolution, resolution, 3), np.uint8)
    labels = np.arange(num_images) % len(LETTERS)
    for i in range(num_images):
        rng = np.random.default_rng((SETS.index("letters"), i))  # image i is the same whatever the count
        images[i] = _render_letter(LETTERS[labels[i]], resolution, rng, fonts)
    return images, labels, list(LETTERS)


@functools.lru_cache(maxsize=1)
def letter_fonts() -> tuple[Path, ...]:
    """matplotlib's own TrueType text fonts, by file name: those whose every ASCII letter is a glyph of that
    name (not cmsy10's calligraphic capitals and symbols, cmex10's delimiters or a last-resort font) and
    whose ten letters all have ink and differ."""
    import matplotlib
    from matplotlib.ft2font import FT2Font
    from PIL import ImageFont

    fonts = []
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for path in sorted(folder.glob("*.ttf"), key=lambda p: p.name):
        face = FT2Font(str(path))
        if any(face.get_char_index(ord(c)) == 0 or face.get_glyph_name(face.get_char_index(ord(c))) != c
               for c in string.ascii_letters):
            continue
        masks = [ImageFont.truetype(str(path), 48).getmask(c) for c in LETTERS]
        if all(m.getbbox() for m in masks) and len({bytes(m) for m in masks}) == len(LETTERS):
            fonts.append(path)
    if not fonts:
        raise RuntimeError(f"no text font with the letters {''.join(LETTERS)} in {folder}: reinstall matplotlib")
    return tuple(fonts)


@functools.lru_cache(maxsize=1024)
def _glyph(path: Path, letter: str, size: int) -> Image.Image:
    """The letter's coverage (mode L) cropped to its ink, drawn at about `size` px of ink height or more."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(path), size * 3 // 2)
    left, top, right, bottom = font.getbbox(letter)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), letter, font=font, fill=255)
    return canvas.crop(canvas.getbbox())


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour(rng: np.random.Generator, luma: float) -> np.ndarray:
    """A colour of any hue and saturation with exactly this luma: darkened, or mixed toward white."""
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), 1.0)) * 255
    own = _luma(base)
    if luma <= own:
        return base * (luma / own)
    return base + (255 - base) * ((luma - own) / (255 - own))


def _gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lumas: tuple[float, float],
              flat: bool = False) -> np.ndarray:
    """A linear gradient between two colours (lumas picked in the range given) in a random direction,
    over x and y in -1..1; luma is linear in RGB, so every pixel's lies between the two ends'."""
    first, second = (_colour(rng, rng.uniform(*lumas)) for _ in range(2))
    if flat:
        return np.broadcast_to(first, (*x.shape, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y) / np.sqrt(2) * 0.5 + 0.5  # within 0..1 anywhere in the square
    return first + (second - first) * t[..., None]


def _render_letter(letter: str, resolution: int, rng: np.random.Generator, fonts: tuple[Path, ...]) -> np.ndarray:
    size = resolution * _SUPERSAMPLE
    font = fonts[rng.integers(len(fonts))]
    glyph = _glyph(font, letter, size)
    height = rng.uniform(0.55, 0.85) * size
    angle = rng.uniform(-15, 15)
    # the turned letter's box must fit inside the image with a margin (2 px more for the turn's blur and
    # rounding): shrink the letter where it would not
    width = height * glyph.width / glyph.height
    cos, sin = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
    margin = max(1, size // 32)
    room = size - 2 * margin
    scale = min(1.0, (room - 2) / (width * cos + height * sin), (room - 2) / (width * sin + height * cos))
    shape = (max(1, int(width * scale)), max(1, int(height * scale)))
    mask = glyph.resize(shape, Image.BILINEAR).rotate(angle, Image.BILINEAR, expand=True)
    mask = mask.crop(mask.getbbox())
    left = margin + rng.integers(room - mask.width + 1)
    top = margin + rng.integers(room - mask.height + 1)
    coverage = np.zeros((size, size), np.float32)
    coverage[top : top + mask.height, left : left + mask.width] = np.asarray(mask, np.float32) / 255
    # drawn at 4x, averaged: anti-aliased edges. The colours are affine in x and y, so their mean over
    # a pixel's 4x4 samples is their value at its centre: they are computed at the image's resolution.
    coverage = coverage.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))

    # one side of the luma scale for the background, the other for the letter, _MIN_LUMA_GAP apart
    split = rng.uniform(40 + _MIN_LUMA_GAP / 2, 215 - _MIN_LUMA_GAP / 2)
    dark, light = (0.0, split - _MIN_LUMA_GAP / 2), (split + _MIN_LUMA_GAP / 2, 255.0)
    background_lumas, letter_lumas = (dark, light) if rng.uniform() < 0.5 else (light, dark)
    y, x = _pixel_centres(resolution)
    background = _gradient(rng, x, y, background_lumas)
    fill = _gradient(rng, x, y, letter_lumas, flat=rng.uniform() < 0.5)
    pixels = background + (fill - background) * coverage[..., None]
    return pixels.round().clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """y and x of each pixel's centre, -1..1."""
    grid = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    return tuple(np.meshgrid(grid, grid, indexing="ij"))


def _digits(resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits  # ships its data inside the wheel: no download

    digits = load_digits()
    small = (digits.images / 16 * 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in small])
    return images[..., None], digits.target.astype(np.int64), [str(d) for d in range(10)]
