"""difftool.data: every source decodes to the same uint8 layout, caching is safe, batches are reproducible."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from difftool import data as data_mod
from difftool.config import DataConfig
from difftool.data import (
    ImageData,
    from_hf_dataset,
    load_dataset,
    make_batch,
    make_shapes,
)
from difftool.data import decode as decode_mod
from difftool.errors import UserError


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def foreground(images: torch.Tensor) -> torch.Tensor:
    """Pixels that differ clearly from the top-left corner, which shapes never reach."""
    corner = images[:, :, :1, :1].int()
    return (images.int() - corner).abs().amax(1) > 40


# ---------------------------------------------------------------- shapes


def test_shapes_are_deterministic_balanced_uint8():
    a = load_dataset(cfg(num_images=500))
    b = load_dataset(cfg(num_images=500))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (500, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.dtype == torch.int64 and len(a) == 500 and a.channels == 3
    assert a.label_names == ["circle", "square", "triangle", "ring", "cross"]
    assert torch.bincount(a.labels).tolist() == [100] * 5
    assert a.images.min() < 60 and a.images.max() > 200  # full range used, not a washed-out band
    # the first N images do not depend on how many are generated
    assert torch.equal(make_shapes(37, 32).images, a.images[:37])
    assert len(load_dataset(cfg(num_images=500, max_images=20))) == 20


@pytest.mark.parametrize("resolution", [8, 16, 48])
def test_shapes_any_resolution(resolution):
    d = make_shapes(50, resolution)
    assert d.images.shape == (50, 3, resolution, resolution)
    fg = foreground(d.images).float().mean((1, 2))
    assert (fg > 0.05).all() and (fg < 0.75).all()  # one shape (at most ~57 % + edge pixels), never the whole image


def test_shapes_classes_differ_and_contrast():
    d = make_shapes(1000, 32)
    coverage = foreground(d.images).float().mean((1, 2))
    per_class = torch.stack([coverage[d.labels == k].mean() for k in range(5)])
    circle, ring = per_class[0], per_class[3]
    assert circle > 1.2 * ring  # the ring's hole is visible
    assert per_class[0] > per_class[1]  # a square inscribed in the circle covers less
    luma = d.images.float().mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    contrast = (luma - luma[:, :1, :1]).abs().amax((1, 2))
    assert contrast.min() > 0.35 * 255


def test_shapes_grayscale_is_luma_of_colour():
    gray = load_dataset(cfg(num_images=20, channels=1))
    colour = make_shapes(20, 32)
    assert gray.images.shape == (20, 1, 32, 32) and gray.channels == 1
    expected = np.stack([np.array(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")) for x in colour.images])
    assert torch.equal(gray.images[:, 0], torch.from_numpy(expected))


# ---------------------------------------------------------------- folders


def make_class_folder(root: Path) -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: must become white
    save(root / "cat" / "a_rgba.png", rgba)
    pal = rgb(64, 48, 1).convert("P", palette=Image.Palette.ADAPTIVE)
    save(root / "cat" / "b_palette.PNG", pal)
    save(root / "cat" / "c.jpg", rgb(50, 30, 2), quality=95)
    save(root / "dog" / "sub" / "d.webp", rgb(32, 32, 3))
    sixteen = Image.fromarray(np.full((36, 36), 128 * 257, dtype=np.uint16))  # mode I;16
    save(root / "dog" / "e16.png", sixteen)
    save(root / "dog" / "f_gray.jpeg", Image.new("L", (20, 20), 77))
    save(root / "dog" / "notes.txt.bak", Image.new("L", (4, 4)), format="PNG")  # not an image suffix
    save(root / "dog" / ".hidden.png", Image.new("L", (4, 4)))


def test_folder_with_class_subfolders_and_mixed_modes(tmp_path):
    make_class_folder(tmp_path / "imgs")
    d = load_dataset(cfg(dataset=str(tmp_path / "imgs"), resolution=16), cache_dir=tmp_path / "cache")
    assert d.label_names == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1] and d.channels == 3
    assert isinstance(d.images, list)  # the 64x48 and 50x30 images keep their aspect ratio
    shapes = [tuple(t.shape) for t in d.images]
    assert shapes == [(3, 16, 16), (3, 16, 21), (3, 16, 27), (3, 16, 16), (3, 16, 16), (3, 16, 16)]
    assert all(t.dtype == torch.uint8 for t in d.images)
    assert (d.images[0] == 255).all()  # alpha composited onto white
    sixteen, gray = d.images[3], d.images[4]  # sorted: dog/e16.png, dog/f_gray.jpeg, dog/sub/d.webp
    assert (sixteen.int() - 128).abs().max() <= 1 and torch.equal(sixteen[0], sixteen[2])  # scaled, not clipped
    assert (gray.int() - 77).abs().max() <= 1
    assert "folder" in d.source and "6 images" in d.source


def test_folder_all_grayscale_gives_one_channel(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", Image.new("L", (20, 20), 10 * i))
    save(tmp_path / "3_alpha.png", Image.new("LA", (20, 20), (0, 0)))  # transparent black -> white
    d = load_dataset(cfg(dataset=str(tmp_path), resolution=16), cache_dir=tmp_path / "c")
    assert d.images.shape == (4, 1, 16, 16) and d.labels is None and d.label_names is None
    assert d.images[1].eq(10).all() and d.images[3].eq(255).all()
    forced = load_dataset(cfg(dataset=str(tmp_path), resolution=16, channels=3), cache_dir=tmp_path / "c")
    assert forced.images.shape == (4, 3, 16, 16) and torch.equal(forced.images[:, 0], forced.images[:, 2])


def test_every_command_reads_the_same_image_suffixes(tmp_path):
    # One list: a BMP or TIFF that inpaint accepts as a mask is a training image and an evaluated image too.
    from difftool.evaluation.imagesets import open_images

    for i, suffix in enumerate((".png", ".bmp", ".tif", ".tiff")):
        save(tmp_path / "mixed" / f"{i}{suffix}", Image.new("L", (8, 8), 40 * i))
    d = load_dataset(cfg(dataset=str(tmp_path / "mixed"), resolution=8), cache_dir=tmp_path / "c")
    assert [int(t.float().mean()) for t in d.images] == [0, 40, 80, 120]
    assert open_images(tmp_path / "mixed").count == 4


def test_folder_single_subfolder_or_label_none_has_no_labels(tmp_path):
    save(tmp_path / "one" / "only" / "a.png", rgb(8, 8, 0))
    save(tmp_path / "one" / "only" / "b.png", rgb(8, 8, 1))
    assert load_dataset(cfg(dataset=str(tmp_path / "one"), resolution=8), cache_dir=tmp_path / "c").labels is None
    make_class_folder(tmp_path / "two")
    d = load_dataset(cfg(dataset=str(tmp_path / "two"), resolution=8, label_column="none"), cache_dir=tmp_path / "c")
    assert d.labels is None and len(d) == 6


def test_loose_images_next_to_class_folders_is_an_error(tmp_path):
    make_class_folder(tmp_path)
    save(tmp_path / "stray.png", rgb(8, 8, 0))
    with pytest.raises(UserError, match="stray.png.*--label-column none"):
        load_dataset(cfg(dataset=str(tmp_path), resolution=8), cache_dir=tmp_path / "c")


def test_corrupt_and_empty_files_are_skipped_and_counted(tmp_path, caplog):
    for i in range(3):
        save(tmp_path / f"good{i}.png", rgb(12, 12, i))
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with caplog.at_level(logging.WARNING, logger="difftool"):
        d = load_dataset(cfg(dataset=str(tmp_path), resolution=8), cache_dir=tmp_path / "c")
    assert len(d) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 5" in warnings[0] and "\n" not in warnings[0]


def test_only_corrupt_files_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 2 images"):
        load_dataset(cfg(dataset=str(tmp_path), resolution=8), cache_dir=tmp_path / "c")


def test_empty_and_missing_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"no images found in .*empty.*\.png/\.jpg/\.jpeg/\.webp"):
        load_dataset(cfg(dataset=str(tmp_path / "empty")), cache_dir=tmp_path / "c")
    for missing in [str(tmp_path / "nope"), "./nope", "~/definitely/not/here", "a/b/c"]:
        with pytest.raises(UserError, match="dataset folder not found"):
            load_dataset(cfg(dataset=missing), cache_dir=tmp_path / "c")


def test_bad_channels_is_an_error():
    with pytest.raises(UserError, match="channels"):
        load_dataset(cfg(channels=2))


# ---------------------------------------------------------------- cache


def test_cache_hit_skips_decoding_and_change_invalidates(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(4):
        save(root / f"{i}.png", rgb(10 + 4 * i, 10, i))  # different sizes: the list layout
    c = cfg(dataset=str(root), resolution=8)
    first = load_dataset(c, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def fail(*_):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decode_mod, "_decode_image", fail)
    again = load_dataset(c, cache_dir=tmp_path / "cache")
    assert again.source == first.source and again.channels == first.channels
    assert all(torch.equal(a, b) for a, b in zip(first.images, again.images, strict=True))

    monkeypatch.undo()
    save(root / "2.png", rgb(30, 10, 99))
    os.utime(root / "2.png", ns=(1, 1))  # mtime alone would be enough; make it differ for sure
    calls = []
    real = decode_mod._decode_image
    monkeypatch.setattr(decode_mod, "_decode_image", lambda *a: calls.append(a) or real(*a))
    changed = load_dataset(c, cache_dir=tmp_path / "cache")
    assert len(calls) == 4 and not torch.equal(changed.images[2], first.images[2])


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    save(tmp_path / "imgs" / "a" / "x.png", rgb(8, 8, 0))
    save(tmp_path / "imgs" / "b" / "y.png", rgb(8, 8, 1))
    c = cfg(dataset=str(tmp_path / "imgs"), resolution=8)
    first = load_dataset(c, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    cache_file.write_bytes(cache_file.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="difftool"):
        again = load_dataset(c, cache_dir=tmp_path / "cache")
    assert "unreadable data cache" in caplog.text
    assert torch.equal(first.images, again.images) and again.label_names == ["a", "b"]
    assert torch.equal(again.labels, torch.tensor([0, 1]))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- Hugging Face datasets


def hf_dataset(labels, names=None, mode="RGB", image_col="img", label_col="label") -> datasets.Dataset:
    images = [Image.new(mode, (12, 12), (40 * i,) * len(mode)) for i in range(len(labels))]
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("string")
    features = datasets.Features({image_col: datasets.Image(), label_col: label_feature})
    return datasets.Dataset.from_dict({image_col: images, label_col: labels}, features=features)


def test_from_hf_dataset_classlabel():
    ds = hf_dataset([0, 2, 1, 2], names=["ant", "bee", "cat"])
    d = from_hf_dataset(ds, cfg(dataset="local", resolution=8))
    assert d.images.shape == (4, 3, 8, 8) and d.channels == 3
    assert d.labels.tolist() == [0, 2, 1, 2] and d.label_names == ["ant", "bee", "cat"]
    assert (d.images[1].int() - 40).abs().max() <= 1


def test_from_hf_dataset_string_labels_and_grayscale():
    ds = hf_dataset(["zebra", "ant", "zebra"], mode="L", label_col="class")
    d = from_hf_dataset(ds, cfg(dataset="local", resolution=8))
    assert d.images.shape == (3, 1, 8, 8) and d.channels == 1
    assert d.label_names == ["ant", "zebra"] and d.labels.tolist() == [1, 0, 1]
    assert from_hf_dataset(ds, cfg(dataset="local", resolution=8, label_column="none")).labels is None
    assert len(from_hf_dataset(ds, cfg(dataset="local", resolution=8, max_images=2))) == 2
    with pytest.raises(UserError, match="holds no images"):
        from_hf_dataset(ds.select([]), cfg(dataset="local"))


def test_missing_image_column_is_explained():
    ds = datasets.Dataset.from_dict({"caption": ["a"], "score": [1]})
    expected = r"no image column found in local \(columns: caption, score\); .*--image-column"
    with pytest.raises(UserError, match=expected):
        from_hf_dataset(ds, cfg(dataset="local"))
    with pytest.raises(UserError, match="image column 'photo' not found"):
        from_hf_dataset(hf_dataset([0], names=["a"]), cfg(dataset="local", image_column="photo"))


def test_load_dataset_alias_goes_through_hub_and_cache(tmp_path, monkeypatch):
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return hf_dataset([1, 0], names=["airplane", "automobile"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_dataset(cfg(dataset="cifar10", resolution=8), cache_dir=tmp_path)
    assert calls == [("uoft-cs/cifar10", "train")]
    assert d.label_names == ["airplane", "automobile"] and d.labels.tolist() == [1, 0]
    assert "uoft-cs/cifar10" in d.source
    monkeypatch.setattr(decode_mod, "_decode_image", lambda *a: pytest.fail("decoded although cached"))
    assert torch.equal(load_dataset(cfg(dataset="cifar10", resolution=8), cache_dir=tmp_path).images, d.images)


def test_hub_failure_is_one_line_with_offline_remedy(tmp_path, monkeypatch):
    def fail(name, split):
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(UserError) as err:
        load_dataset(cfg(dataset="someone/something"), cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "someone/something" in message
    assert "Couldn't reach the Hub" in message and "shapes" in message and "second line" not in message


# ---------------------------------------------------------------- batches


def stacked(n: int = 64, size: int = 8) -> ImageData:
    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData(images=images, labels=torch.arange(n) % 3, label_names=["a", "b", "c"], channels=3, source="test")


def test_make_batch_is_reproducible_and_in_range():
    d = stacked()
    idx = torch.tensor([5, 1, 5, 63])

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return make_batch(d, idx, resolution=8, random_flip=True, crop="random", generator=g)

    x, y = run(0)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1 and y.tolist() == [2, 1, 2, 0]
    assert torch.equal(x, run(0)[0])
    assert any(not torch.equal(x, run(seed)[0]) for seed in range(1, 5))


def test_make_batch_flips_about_half():
    d = stacked()
    idx = torch.arange(64)
    x, _ = make_batch(d, idx, resolution=8, random_flip=True, crop="center", generator=torch.Generator().manual_seed(3))
    plain = d.images.float() / 127.5 - 1
    same = (x == plain).flatten(1).all(1)
    flipped = (x == plain.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and 10 < flipped.sum() < 54
    unflipped, _ = make_batch(d, idx, resolution=8, random_flip=False, crop="center")
    assert torch.equal(unflipped, plain)


def test_random_crop_on_non_square_images():
    columns = torch.arange(40, dtype=torch.uint8).expand(3, 16, 40)  # pixel value = column index
    d = ImageData(images=[columns.clone(), columns[:, :, :24].clone()], labels=None, label_names=None, channels=3,
                  source="test")
    centre, labels = make_batch(d, torch.tensor([0, 1]), resolution=16, random_flip=False, crop="center")
    assert labels is None
    assert ((centre[0, 0, 0] + 1) * 127.5).round().tolist() == list(range(12, 28))
    lefts = set()
    for seed in range(30):
        x, _ = make_batch(d, torch.tensor([0, 1]), resolution=16, random_flip=False, crop="random",
                          generator=torch.Generator().manual_seed(seed))
        row = ((x[:, 0, 0] + 1) * 127.5).round()
        assert torch.equal(row[:, 1:] - row[:, :-1], torch.ones(2, 15))  # a contiguous window
        assert row[0, 0] <= 24 and row[1, 0] <= 8
        lefts.add(int(row[0, 0]))
    assert len(lefts) > 5


def test_make_batch_rejects_unknown_crop():
    with pytest.raises(UserError, match="unknown crop"):
        make_batch(stacked(), torch.tensor([0]), resolution=8, random_flip=False, crop="middle")


def test_aliases_name_real_columns():
    for name, alias in data_mod.DATASET_ALIASES.items():
        assert "/" in alias.repo_id and alias.image_column, name
    assert dataclasses.astuple(data_mod.DATASET_ALIASES["cifar10"]) == ("uoft-cs/cifar10", "img", "label")
