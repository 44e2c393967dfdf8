"""Hostile image files through every reader (the one decoder, images.py): broken, oversized and unusual images.

Broken files in a folder are skipped with one warning or note that names one of them and the count;
a broken file given as an argument is a one-line error naming it. Valid but unusual image formats
must give the right pixels, not just no crash.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
from PIL import Image

from difftool.config import DataConfig
from difftool.data import load_dataset
from difftool.errors import UserError
from difftool.evaluation.imagesets import open_images
from difftool.inpainting.pairs import load_pair
from tests.conftest import assert_user_error, invoke

PILLOW_PIXEL_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Pillow's default Image.MAX_IMAGE_PIXELS


pytestmark = pytest.mark.usefixtures("scratch_cwd")


# ---------------------------------------------------------------- making hostile image files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow does not write: 16-bit RGB, or a header without its pixels."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bomb(width: int, height: int) -> bytes:
    """69 bytes that claim width x height RGB pixels: decoding it would allocate them (and then fail)."""
    return png(width, height, 8, 2, b"\0" * 64)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: int = 8, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# name: (file suffix, bytes, what the message says about it, in either case: Pillow also writes "Truncated File Read")
BROKEN = {
    "empty": (".png", lambda: b"", "the file is empty"),
    "not an image": (".png", lambda: b"hello, not a picture", "not an image format Pillow can read"),
    "truncated png": (".png", lambda: encoded(noise(32), "PNG")[:300], "truncated"),
    "truncated jpeg": (".jpg", lambda: encoded(noise(32), "JPEG", quality=95)[:500], "truncated"),
    "bomb": (".png", lambda: bomb(20_000, 20_000), "decompression bomb"),
    # Between Pillow's limit and twice it Pillow only warns, then decodes: refused all the same.
    "bomb within twice the limit": (".png", lambda: bomb(10_000, 10_000), "decompression bomb"),
}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_bytes_name(folder: Path, name: bytes, data: bytes) -> Path:
    """A file whose name is not UTF-8, created through the bytes API; returned as Python sees it."""
    fd = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return folder / os.fsdecode(name)


def good_images(folder: Path, count: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"good{i}.png" for i in range(count)]
    for i, path in enumerate(paths):
        noise(seed=i).save(path)
    return paths


def load_folder(folder: Path, **kw):
    return load_dataset(DataConfig(dataset=str(folder), resolution=8, **kw), cache_dir=folder.parent / "cache")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "difftool"]


# ---------------------------------------------------------------- broken images in folders


@pytest.mark.parametrize("kind", BROKEN)
def test_training_folder_skips_a_broken_file_with_one_warning(tmp_path, caplog, kind):
    suffix, data, reason = BROKEN[kind]
    good_images(tmp_path / "data")
    write(tmp_path / "data" / f"bad{suffix}", data())
    with caplog.at_level(logging.WARNING, logger="difftool"):
        assert len(load_folder(tmp_path / "data")) == 2
    [warning] = warnings_of(caplog)
    assert "skipped 1 of 3 images" in warning and f"bad{suffix}: " in warning and reason.lower() in warning.lower()
    assert Image.MAX_IMAGE_PIXELS == PILLOW_PIXEL_LIMIT  # kept, not lifted


@pytest.mark.parametrize("kind", BROKEN)
def test_evaluation_folder_skips_a_broken_file_with_a_note(tmp_path, kind):
    suffix, data, reason = BROKEN[kind]
    good_images(tmp_path / "imgs")
    write(tmp_path / "imgs" / f"bad{suffix}", data())
    images = open_images(tmp_path / "imgs")
    assert images.count == 2 and sum(len(b) for b in images.batches(4)) == 2
    [note] = [n for n in images.notes if "skipped" in n]
    assert "skipped 1 of 3 images" in note and f"bad{suffix}: " in note and reason.lower() in note.lower()


def test_a_folder_of_nothing_but_broken_files_is_one_error(tmp_path):
    for kind, (suffix, data, _) in BROKEN.items():
        write(tmp_path / "data" / f"{kind.replace(' ', '_')}{suffix}", data())
    with pytest.raises(UserError, match=f"none of the {len(BROKEN)} images in folder .*could be decoded") as err:
        load_folder(tmp_path / "data")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"of its {len(BROKEN)} images, {len(BROKEN)} could not be decoded.* holds 0 "
                                        "images") as err:
        open_images(tmp_path / "data")
    assert "\n" not in str(err.value)


def test_training_cli_with_only_broken_images_is_one_line(tmp_path):
    write(tmp_path / "data" / "a.png", b"")
    write(tmp_path / "data" / "b.png", bomb(20_000, 20_000))
    assert_user_error(invoke("train", "--dataset", tmp_path / "data", "--resolution", "16", "--output", "run"),
                      "none of the 2 images", "a.png: the file is empty")


def test_a_strip_that_resizing_would_blow_up_is_skipped(tmp_path, caplog):
    """1.5 megapixels, 1 pixel high: scaled to 8 px high it would have 96 megapixels, over Pillow's limit."""
    good_images(tmp_path / "data")
    Image.new("L", (1_500_000, 1), 128).save(tmp_path / "data" / "strip.png")
    with caplog.at_level(logging.WARNING, logger="difftool"):
        assert len(load_folder(tmp_path / "data")) == 2
    [warning] = warnings_of(caplog)
    assert "strip.png: it is 1500000x1" in warning and "crop it" in warning


def test_symlink_loops_and_fifos_do_not_stop_a_folder_scan(tmp_path):
    folder = tmp_path / "data"
    good = good_images(folder / "a")
    (folder / "a" / "loop").symlink_to("..")  # a/loop/a/loop/... if followed
    (folder / "self.png").symlink_to("self.png")  # a link to itself
    os.mkfifo(folder / "pipe.png")  # opening it would wait for a writer forever
    data = load_folder(folder)
    assert len(data) == 2
    with Image.open(good[0]) as first:
        np.testing.assert_array_equal(data.images[0].permute(1, 2, 0).numpy(), np.asarray(first))
    assert open_images(folder).count == 2


# ---------------------------------------------------------------- file names that are not UTF-8


def test_names_that_are_not_utf8_are_read_and_reported_without_encoding_errors(tmp_path, caplog):
    folder = tmp_path / "data"
    good_images(folder, 1)
    write_bytes_name(folder, b"\xfe\xff-good.png", encoded(noise(seed=5), "PNG"))
    write_bytes_name(folder, b"\xff\xfe.png", b"junk")
    with caplog.at_level(logging.WARNING, logger="difftool"):
        assert len(load_folder(folder)) == 2
    [warning] = warnings_of(caplog)
    assert "\\udcff\\udcfe.png: not an image format" in warning
    warning.encode("utf-8")  # what a log file or a strict stream needs
    [note] = [n for n in open_images(folder).notes if "skipped" in n]
    assert "\\udcff\\udcfe.png: not an image format" in note
    note.encode("utf-8")


def test_warnings_naming_such_files_reach_a_strict_log_stream(tmp_path, capsys):
    """A log handler writing UTF-8 strictly (a log file, say) gets the warning, not a "Logging error"."""
    folder = tmp_path / "data"
    good_images(folder, 1)
    write_bytes_name(folder, b"\xff.png", b"junk")
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    handler = logging.StreamHandler(stream)
    logging.getLogger("difftool").addHandler(handler)
    try:
        load_folder(folder)
    finally:
        logging.getLogger("difftool").removeHandler(handler)
    stream.flush()
    assert "\\udcff.png" in stream.buffer.getvalue().decode()
    assert "Logging error" not in capsys.readouterr().err


def test_a_data_folder_whose_own_name_is_not_utf8_is_decoded_and_cached(tmp_path):
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff"))
    good_images(folder)
    assert len(load_dataset(DataConfig(dataset=str(folder), resolution=8), cache_dir=tmp_path / "cache")) == 2
    [cached] = (tmp_path / "cache").glob("*.safetensors")
    with safetensors.safe_open(cached, "pt") as f:
        assert "\\udcff" in f.metadata()["source"]


def test_inpainting_an_image_whose_name_is_not_utf8(tiny_run, tmp_path):
    image = write_bytes_name(tmp_path, b"\xff\xfe.png", encoded(noise(), "PNG"))
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    result = invoke("inpaint", image, tmp_path / "mask.png", "--model", tiny_run, "--method", "blend", "--steps", "2",
                    "-o", tmp_path / "out.png", "-q")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as out:
        assert out.text["image"] == "\\udcff\\udcfe.png"
    broken = write_bytes_name(tmp_path, b"m\xff.png", b"")
    assert_user_error(invoke("inpaint", image, broken, "--model", tiny_run, "-o", tmp_path / "out2.png"),
                      "cannot read mask", "m\\udcff.png: the file is empty")


# ---------------------------------------------------------------- broken image and mask arguments


@pytest.mark.parametrize("which", ["image", "mask"])
@pytest.mark.parametrize("kind", ["truncated jpeg", "bomb", "bomb within twice the limit"])
def test_inpaint_refuses_a_broken_file_in_one_line(tiny_run, tmp_path, which, kind):
    suffix, data, reason = BROKEN[kind]
    bad = write(tmp_path / f"bad{suffix}", data())
    good = tmp_path / "good.png"
    (noise() if which == "mask" else Image.new("L", (8, 8), 255)).save(good)
    image, mask = (bad, good) if which == "image" else (good, bad)
    line = assert_user_error(invoke("inpaint", image, mask, "--model", tiny_run, "-o", tmp_path / "out.png"),
                             f"cannot read {which} {bad}: ")
    assert reason.lower() in line.lower()
    assert line.endswith("downscale it" if "bomb" in kind else "re-save it as PNG or JPEG")
    assert not (tmp_path / "out.png").exists()


def test_inpaint_refuses_a_pipe_instead_of_waiting_on_it(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    with pytest.raises(UserError, match="pipe.png is not a regular file; give the path of an image file"):
        load_pair(tmp_path / "pipe.png", tmp_path / "mask.png", resolution=8, channels=3)


# ---------------------------------------------------------------- valid but unusual formats

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
ALPHA = np.where(RNG.random((8, 8)) < 0.5, 0, 255).astype(np.uint8)  # fully transparent or opaque: exact maths
PALETTE = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 4, (8, 8), dtype=np.uint8)
BANDS = np.broadcast_to(np.arange(8) // 2, (8, 8))  # four vertical bands, two pixels wide
CMYK = np.array([[0, 255, 255, 0], [255, 0, 255, 0], [255, 255, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)[BANDS]
CMYK_AS_RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)[BANDS]


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where((alpha == 255)[..., None] if colour.ndim == 3 else alpha == 255, colour, 255).astype(np.uint8)


def palette_image(transparent: bool) -> bytes:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return encoded(image, "PNG", **({"transparency": 0} if transparent else {}))


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


# name: (suffix, file bytes, RGB over white (what training and evaluation see), what inpainting keeps, its mode)
UNUSUAL = {
    "16-bit gray": (".png", lambda: encoded(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG"),
                    gray3(GRAY), GRAY, "L"),
    "16-bit RGB": (".png", lambda: png(8, 8, 16, 2, b"".join(b"\0" + (RGB[y].astype(">u2") * 257).tobytes()
                                                             for y in range(8))),
                   RGB, RGB, "RGB"),
    "palette": (".png", lambda: palette_image(False), PALETTE[INDICES], PALETTE[INDICES], "RGB"),
    "palette with transparency": (".png", lambda: palette_image(True),
                                  np.where((INDICES == 0)[..., None], 255, PALETTE[INDICES]).astype(np.uint8),
                                  np.dstack([PALETTE[INDICES], np.where(INDICES == 0, 0, 255)]), "RGBA"),
    "CMYK": (".jpg", lambda: encoded(Image.fromarray(CMYK, "CMYK"), "JPEG", quality=100, subsampling=0),
             CMYK_AS_RGB, CMYK_AS_RGB, "RGB"),
    "RGBA": (".png", lambda: encoded(Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), "PNG"),
             over_white(RGB, ALPHA), np.dstack([RGB, ALPHA]), "RGBA"),
    "LA": (".png", lambda: encoded(Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), "PNG"),
           gray3(over_white(GRAY, ALPHA)), np.dstack([gray3(GRAY), ALPHA]), "RGBA"),
}
TOLERANCE = {"CMYK": 6}  # JPEG is lossy even at quality 100; every other format must be exact


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_formats_give_the_right_pixels_everywhere(tmp_path, kind):
    suffix, data, rgb, kept, mode = UNUSUAL[kind]
    path = write(tmp_path / "data" / f"image{suffix}", data())
    tolerance = TOLERANCE.get(kind, 0)

    def assert_pixels(actual, expected):
        np.testing.assert_allclose(np.asarray(actual, dtype=int), np.asarray(expected, dtype=int), atol=tolerance, rtol=0)

    trained = load_folder(tmp_path / "data", channels=3)  # 8x8 at resolution 8: no resizing
    assert_pixels(trained.images[0].permute(1, 2, 0), rgb)
    shutil.copy(path, tmp_path / "data" / f"copy{suffix}")  # the metrics need two images
    assert_pixels(next(open_images(tmp_path / "data").batches(1))[0].permute(1, 2, 0), rgb)
    Image.new("L", (8, 8), 0).save(tmp_path / "mask.png")
    pair = load_pair(path, tmp_path / "mask.png", resolution=8, channels=3)
    assert pair.original.mode == mode
    assert_pixels(pair.original, kept)


# ---------------------------------------------------------------- several frames

FRAMES = [Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]


def several_frames(fmt: str) -> bytes:
    """An animated GIF, PNG or WebP, or a multi-page TIFF, of the three FRAMES."""
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(FRAMES[0], fmt, save_all=True, append_images=FRAMES[1:], **options)


def first_frame_notes(text: str) -> list[str]:
    return [line for line in text.splitlines() if "several frames" in line]


def test_images_with_several_frames_are_read_by_their_first_with_one_warning(tmp_path, caplog):
    """Data and evaluation folders read animated PNG and WebP (their suffixes); one warning names them."""
    good_images(tmp_path / "data")
    for fmt in ("PNG", "WEBP"):
        write(tmp_path / "data" / f"animated.{fmt.lower()}", several_frames(fmt))
    with caplog.at_level(logging.WARNING, logger="difftool"):
        data = load_folder(tmp_path / "data", channels=3)
    [warning] = warnings_of(caplog)
    assert "animated.png and 1 more have several frames (animated or multi-page); only the first frame is used" \
        in warning
    first = np.asarray(FRAMES[0])
    assert {tuple(np.asarray(image.permute(1, 2, 0)).ravel()) for image in data.images} >= {tuple(first.ravel())}
    images = open_images(tmp_path / "data")
    assert images.count == 4
    assert len(first_frame_notes("\n".join(images.notes))) == 1


def test_inpaint_reads_animated_and_multi_page_files_by_their_first_frame_with_one_note(tiny_run, tmp_path):
    files = {"images/a.tiff": "TIFF", "images/b.webp": "WEBP", "masks/a.tiff": "TIFF", "masks/b.tiff": "TIFF",
             "photo.gif": "GIF", "mask.tiff": "TIFF"}
    for name, fmt in files.items():
        write(tmp_path / name, several_frames(fmt))
    blend = ["--model", tiny_run, "--method", "blend", "--steps", "2", "-q"]
    for args, named in (([tmp_path / "images", tmp_path / "masks", "-o", tmp_path / "filled"], "a.tiff and 3 more"),
                        ([tmp_path / "photo.gif", tmp_path / "mask.tiff", "-o", tmp_path / "filled.png"],
                         "photo.gif and 1 more")):
        result = invoke("inpaint", *args, *blend)
        assert result.exit_code == 0, result.output
        [note] = first_frame_notes(" ".join(result.stderr.split()).replace("note: ", "\nnote: "))
        assert f"{named} have several frames" in note
    with Image.open(tmp_path / "filled.png") as filled:
        assert filled.size == FRAMES[0].size
