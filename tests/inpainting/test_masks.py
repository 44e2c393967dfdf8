"""difftool.inpainting.pairs and .paste: any mask mode gives one binary mask, geometry round-trips, the kept region stays bit-exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.errors import UserError
from difftool.inpainting.pairs import find_pairs, load_pair
from difftool.inpainting.paste import comparison, paste_back

PATTERN = np.random.default_rng(0).random((8, 8)) < 0.5  # True = generate


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def gray(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8), "L")


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def load(tmp_path: Path, image: Image.Image, mask: Image.Image, **kw):
    kw = {"resolution": image.width, "channels": 3, **kw}
    return load_pair(save(image, tmp_path / "image.png"), save(mask, tmp_path / "mask.png"), **kw)


def generated(pair) -> np.ndarray:
    return pair.mask[0].numpy().astype(bool)


def random_result(pair, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, tuple(pair.image.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- masks


def mask_in_mode(mode: str) -> Image.Image:
    white = gray(PATTERN * 255)
    if mode == "RGBA":  # white everywhere: only alpha says what to generate
        rgba = Image.new("RGBA", white.size, "white")
        rgba.putalpha(white)
        return rgba
    if mode == "I;16":
        return Image.fromarray((PATTERN * 65535).astype(np.uint16))
    return white.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P", "I;16"])
def test_every_mask_mode_gives_the_same_binary_mask(tmp_path, mode):
    mask = mask_in_mode(mode)
    assert mask.mode == mode
    pair = load(tmp_path, noise(8, 8), mask)
    assert pair.mask.shape == (1, 8, 8) and pair.mask.dtype == torch.float32
    np.testing.assert_array_equal(generated(pair), PATTERN)


def test_masks_are_split_at_half_brightness(tmp_path):
    assert generated(load(tmp_path, noise(4, 4), gray([[0, 127, 128, 255]] * 4)))[0].tolist() == [
        False, False, True, True]
    rgba = Image.new("RGBA", (4, 4), "white")
    rgba.putalpha(gray([[0, 127, 128, 255]] * 4))  # alpha x luminance
    pair = load(tmp_path, noise(4, 4), rgba)
    assert generated(pair)[0].tolist() == [False, False, True, True]
    sixteen = Image.fromarray(np.array([[0, 32767, 32768, 65535]] * 4, dtype=np.uint16))
    assert generated(load(tmp_path, noise(4, 4), sixteen))[0].tolist() == [False, False, True, True]


def test_invert_swaps_generate_and_keep(tmp_path):
    pair = load(tmp_path, noise(8, 8), gray(PATTERN * 255), invert=True)
    np.testing.assert_array_equal(generated(pair), ~PATTERN)


@pytest.mark.parametrize(("grow", "centre", "corner"), [(0, 1, 1), (1, 9, 4), (2, 25, 9)])
def test_grow_dilates_by_whole_model_pixels(tmp_path, grow, centre, corner):
    dot = np.zeros((9, 9))
    dot[4, 4] = 255
    assert load(tmp_path, noise(9, 9), gray(dot), grow=grow).mask.sum() == centre
    dot = np.zeros((9, 9))
    dot[0, 0] = 255
    assert load(tmp_path, noise(9, 9), gray(dot), grow=grow).mask.sum() == corner


def test_negative_grow_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="grow"):
        load(tmp_path, noise(8, 8), gray(PATTERN * 255), grow=-1)


def test_coverage_reports_empty_and_full_masks(tmp_path):
    assert load(tmp_path, noise(8, 8), gray(np.zeros((8, 8)))).coverage == 0.0
    assert load(tmp_path, noise(8, 8), gray(np.full((8, 8), 255))).coverage == 1.0
    assert load(tmp_path, noise(8, 8), gray(PATTERN * 255)).coverage == pytest.approx(PATTERN.mean())


def test_thin_strokes_survive_downscaling(tmp_path):
    line = np.zeros((40, 40))
    line[:, 21] = 255  # one pixel wide: a quarter of a model pixel
    pair = load(tmp_path, noise(40, 40), gray(line), resolution=10)
    assert generated(pair)[:, 5].all() and pair.mask.sum() == 10


# ---------------------------------------------------------------- geometry


def stripes(width: int, height: int, red_columns: int) -> Image.Image:
    """Blue, with the first `red_columns` columns red."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 2] = 255
    array[:, :red_columns] = (255, 0, 0)
    return Image.fromarray(array)


def test_squash_and_crop_see_different_parts_of_the_image(tmp_path):
    image, mask = stripes(40, 30, red_columns=5), np.zeros((30, 40))
    mask[:, :4] = 255
    squashed = load(tmp_path, image, gray(mask), resolution=10)
    assert squashed.box == (0, 0, 40, 30) and squashed.image.shape == (3, 10, 10)
    assert (squashed.image[0, :, 0] > squashed.image[2, :, 0]).all()  # red on the left
    assert squashed.mask[0, :, 0].eq(1).all() and squashed.mask.sum() == 10
    assert any("squashed" in note and "40x30" in note for note in squashed.notes)

    cropped = load(tmp_path, image, gray(mask), resolution=10, crop=True)
    assert cropped.box == (5, 0, 35, 30)
    assert cropped.image[0].eq(-1).all() and cropped.image[2].eq(1).all()  # only blue in the crop
    assert cropped.coverage == 0
    assert any("100.0% of the mask mask.png lies outside the centre crop" in note for note in cropped.notes)


def test_no_notes_for_an_image_the_model_takes_as_it_is(tmp_path):
    assert load(tmp_path, noise(8, 8), gray(PATTERN * 255)).notes == []


def test_paste_back_keeps_the_known_region_bit_exact(tmp_path):
    original = noise(40, 30, seed=3)
    user_mask = np.zeros((30, 40), dtype=bool)
    user_mask[10:20, 15:27] = True
    pair = load(tmp_path, original, gray(user_mask * 255), resolution=16)
    filled = paste_back(pair, random_result(pair))
    assert filled.size == original.size and filled.mode == "RGB"
    before, after, weight = np.asarray(original), np.asarray(filled), np.asarray(pair.weight())
    kept, taken = weight == 0, weight == 255
    np.testing.assert_array_equal(after[kept], before[kept])
    assert (after[taken] != before[taken]).any(axis=-1).mean() > 0.9
    assert ((weight > 0) & (weight < 255)).any()  # a soft seam
    # Far from the user's mask (more than a model pixel, 2.5 px here) nothing is touched.
    near = np.zeros_like(user_mask)
    near[10 - 4 : 20 + 4, 15 - 4 : 27 + 4] = True
    assert kept[~near].all() and taken[user_mask].mean() > 0.5


def test_paste_back_without_resizing_puts_the_result_exactly(tmp_path):
    pair = load(tmp_path, noise(8, 8), gray(PATTERN * 255))
    result = random_result(pair)
    filled = np.asarray(paste_back(pair, result))
    np.testing.assert_array_equal(filled[PATTERN], result.permute(1, 2, 0).numpy()[PATTERN])
    np.testing.assert_array_equal(filled[~PATTERN], np.asarray(pair.original)[~PATTERN])


def test_crop_mode_keeps_everything_outside_the_crop(tmp_path):
    original = noise(40, 30, seed=4)
    pair = load(tmp_path, original, gray(np.full((30, 40), 255)), resolution=10, crop=True)
    assert pair.coverage == 1.0
    assert any("25.0% of the mask mask.png lies outside the centre crop and is kept" in n for n in pair.notes)
    assert any("centre-cropped to 30x30" in n for n in pair.notes)
    before, after = np.asarray(original), np.asarray(paste_back(pair, random_result(pair)))
    np.testing.assert_array_equal(after[:, :5], before[:, :5])
    np.testing.assert_array_equal(after[:, 35:], before[:, 35:])
    assert (after[:, 5:35] != before[:, 5:35]).any(axis=-1).mean() > 0.9


def test_mask_of_the_same_aspect_is_resized_with_a_note(tmp_path):
    small = np.zeros((15, 20))
    small[:, :10] = 255
    pair = load(tmp_path, noise(40, 30), gray(small), resolution=40, crop=True)
    assert any("mask.png (20x15) is resized to its image's 40x30" in note for note in pair.notes)
    assert pair.coverage == pytest.approx(0.5, abs=0.05)
    # 401x300 is within 1% of 4:3, 41x30 is not
    load(tmp_path, noise(40, 30), gray(np.zeros((300, 401))), resolution=8)
    with pytest.raises(UserError, match=r"mask .*mask\.png is 41x30 but its image is 40x30"):
        load(tmp_path, noise(40, 30), gray(np.zeros((30, 41))), resolution=8)


# ---------------------------------------------------------------- channels and modes


def test_grayscale_model_fills_an_rgb_image_in_gray(tmp_path):
    pair = load(tmp_path, noise(8, 8), gray(PATTERN * 255), channels=1)
    assert pair.image.shape == (1, 8, 8)
    assert sum("model is grayscale" in note for note in pair.notes) == 1
    filled = np.asarray(paste_back(pair, random_result(pair)))
    assert filled.shape == (8, 8, 3)
    assert (filled[PATTERN][:, 0] == filled[PATTERN][:, 2]).all()
    np.testing.assert_array_equal(filled[~PATTERN], np.asarray(pair.original)[~PATTERN])


def test_rgb_model_takes_a_gray_image_and_gives_back_gray(tmp_path):
    pair = load(tmp_path, noise(8, 8, "L"), gray(PATTERN * 255), channels=3)
    assert pair.image.shape == (3, 8, 8) and pair.image[0].equal(pair.image[2])
    assert sum("model is RGB" in note for note in pair.notes) == 1
    filled = paste_back(pair, random_result(pair))
    assert filled.mode == "L" and filled.size == (8, 8)


def test_rgba_image_keeps_its_alpha(tmp_path):
    original = noise(12, 8, "RGBA", seed=5)
    mask = np.zeros((8, 12))
    mask[:, 6:] = 255
    pair = load(tmp_path, original, gray(mask), resolution=8)
    assert pair.image.shape == (3, 8, 8)
    filled = paste_back(pair, random_result(pair))
    assert filled.mode == "RGBA"
    assert filled.getchannel("A").tobytes() == original.getchannel("A").tobytes()
    assert np.asarray(filled)[:, 8:, :3].tolist() != np.asarray(original)[:, 8:, :3].tolist()


def test_comparison_shows_transparent_pixels_over_white(tmp_path):
    original = noise(8, 8, "RGBA")
    original.putalpha(0)
    pair = load(tmp_path, original, gray(PATTERN * 255))
    strip = comparison(pair, paste_back(pair, random_result(pair)))
    assert strip.mode == "RGB" and (np.asarray(strip)[2:130, 2:130] == 255).all()


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)
    pair = load(tmp_path, Image.fromarray(ramp), gray(PATTERN * 255), channels=1)
    assert pair.original.mode == "L"
    np.testing.assert_array_equal(np.asarray(pair.original), np.rint(ramp / 257).astype(np.uint8))
    assert any("mode I;16" in note for note in pair.notes)


def test_palette_images_become_rgb(tmp_path):
    image = noise(8, 8).quantize(16)
    pair = load(tmp_path, image, gray(PATTERN * 255))
    assert pair.original.mode == "RGB"
    assert pair.original.tobytes() == image.convert("RGB").tobytes()
    assert any("mode P" in note for note in pair.notes)
    assert paste_back(pair, random_result(pair)).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    path = tmp_path / "turned.png"
    noise(12, 8).save(path, exif=exif)
    pair = load_pair(path, save(gray(np.zeros((12, 8))), tmp_path / "m.png"), resolution=8, channels=3)
    assert pair.original.size == (8, 12) and pair.name == "turned"


# ---------------------------------------------------------------- bad files


def make_bad(kind: str, path: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save(noise(32, 32), path)
        path.write_bytes(path.read_bytes()[:120])
    elif kind == "not an image":
        path.write_text("hello, not a picture")
    elif kind == "a folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("which", ["image", "mask"])
@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not an image", "a folder"])
def test_unreadable_files_are_user_errors_naming_the_file(tmp_path, which, kind):
    bad = make_bad(kind, tmp_path / f"bad-{which}.png")
    good = save(noise(8, 8) if which == "mask" else gray(PATTERN * 255), tmp_path / "good.png")
    image, mask = (bad, good) if which == "image" else (good, bad)
    with pytest.raises(UserError) as err:
        load_pair(image, mask, resolution=8, channels=3)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert message.startswith((f"cannot read {which}", f"{which} {bad}"))


# ---------------------------------------------------------------- folders


def test_find_pairs_matches_by_name_without_extension(tmp_path):
    for name in ["b.png", "a.JPG", "c.tiff", ".hidden.png"]:
        save(noise(4, 4), tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "sub.png").mkdir()
    for name in ["a.png", "b.bmp", "c.webp"]:
        save(gray(np.zeros((4, 4))), tmp_path / "masks" / name)
    pairs = find_pairs(tmp_path / "images", tmp_path / "masks")
    assert [(i.name, m.name) for i, m in pairs] == [("a.JPG", "a.png"), ("b.png", "b.bmp"), ("c.tiff", "c.webp")]


def test_find_pairs_lists_unmatched_names(tmp_path):
    for name in ["a", "b", "c", "d", "e", "shared"]:
        save(noise(4, 4), tmp_path / "images" / f"{name}.png")
    for name in ["shared", "z"]:
        save(noise(4, 4), tmp_path / "masks" / f"{name}.png")
    with pytest.raises(UserError) as err:
        find_pairs(tmp_path / "images", tmp_path / "masks")
    message = str(err.value)
    assert "5 images" in message and "a.png, b.png, c.png and 2 more" in message
    assert "1 masks" in message and "z.png" in message and "shared" not in message


def test_find_pairs_refuses_empty_folders_and_a_single_mask_file(tmp_path):
    (tmp_path / "images").mkdir()
    save(noise(4, 4), tmp_path / "masks" / "a.png")
    with pytest.raises(UserError, match="no images found in"):
        find_pairs(tmp_path / "images", tmp_path / "masks")
    save(noise(4, 4), tmp_path / "images" / "a.png")
    with pytest.raises(UserError, match="give a folder of masks"):
        find_pairs(tmp_path / "images", tmp_path / "masks" / "a.png")
    with pytest.raises(UserError, match="folder of masks not found"):
        find_pairs(tmp_path / "images", tmp_path / "nowhere")


def test_find_pairs_refuses_two_files_of_one_name(tmp_path):
    save(noise(4, 4), tmp_path / "images" / "a.png")
    save(noise(4, 4), tmp_path / "images" / "a.jpg")
    save(noise(4, 4), tmp_path / "masks" / "a.png")
    with pytest.raises(UserError, match="a.jpg and a.png|a.png and a.jpg"):
        find_pairs(tmp_path / "images", tmp_path / "masks")


# ---------------------------------------------------------------- comparison


def test_comparison_of_a_tiny_image_is_enlarged_with_nearest_neighbour(tmp_path):
    pair = load(tmp_path, noise(8, 8), gray(PATTERN * 255))
    filled = paste_back(pair, random_result(pair))
    strip = np.asarray(comparison(pair, filled))
    assert strip.shape == (2 + 128 + 2, 2 + 3 * (128 + 2), 3)  # x16, white separators of 2 px
    for k, panel in enumerate([pair.original, gray(PATTERN * 255).convert("RGB"), filled]):
        left = 2 + k * 130
        enlarged = np.asarray(panel).repeat(16, axis=0).repeat(16, axis=1)
        np.testing.assert_array_equal(strip[2:130, left : left + 128], enlarged)
        assert (strip[:, left - 2 : left] == 255).all()


@pytest.mark.parametrize(("size", "panel"), [((30, 12), (30 * 11, 132)), ((200, 300), (200, 300)),
                                             ((600, 900), (341, 512))])
def test_comparison_height_stays_between_128_and_512(tmp_path, size, panel):
    mask = np.zeros(size[::-1])
    pair = load(tmp_path, noise(*size, "L"), gray(mask), resolution=8, channels=1)
    strip = comparison(pair, pair.original)
    assert strip.mode == "L"
    assert strip.size == (3 * panel[0] + 8, panel[1] + 4)
