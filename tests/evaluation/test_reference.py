"""Reference statistics (evaluation/reference.py): cached, rebuilt, subsampled, loaded from hub data sets.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difftool.errors import UserError
from difftool.evaluation import reference as reference_mod
from difftool.evaluation.evaluate import (
    MetricOptions,
    build_stats,
)
from difftool.evaluation.features import (
    load_extractor,
)
from difftool.evaluation.imagesets import from_tensor
from tests.evaluation.conftest import shapes, write_images

runner = CliRunner()


# ---------------------------------------------------------------- reference statistics


class CountingExtractor:
    """Wraps an extractor to count the images it saw."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.distance_name = inner.name, inner.distance_name

    def __call__(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_reference_statistics_are_cached_and_rebuilt_when_the_data_changes(tmp_path, extractor_file):
    folder = write_images(tmp_path / "real", shapes(12))
    extractor = CountingExtractor(load_extractor(str(extractor_file), device="cpu"))
    first = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 12 and first.count == 12
    again = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 12  # from the cache
    np.testing.assert_allclose(again.stats.mu, first.stats.mu)
    np.testing.assert_allclose(again.features, first.features, rtol=1e-3)  # stored as float16
    write_images(folder, shapes(1, seed_offset=20))  # 0000.png replaced by another shape
    changed = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 24
    assert not np.allclose(changed.stats.mu, first.stats.mu)


def test_statistics_file_round_trip_and_refusals(tmp_path, extractor_file, fake_inception):
    extractor = load_extractor(str(extractor_file), device="cpu")
    options = MetricOptions(features=str(extractor_file), batch_size=7)
    built = build_stats("shapes", tmp_path / "ref.npz", resolution=8, options=options)
    loaded = reference_mod.load(tmp_path / "ref.npz")
    assert loaded.extractor == extractor.name and loaded.resolution == 8 and loaded.count == 10_000
    np.testing.assert_array_equal(loaded.stats.sigma, built.stats.sigma)
    assert loaded.features.shape == (10_000, 16)
    with pytest.raises(UserError, match="already exists"):
        build_stats("shapes", tmp_path / "ref.npz", resolution=8, options=options)
    with pytest.raises(UserError, match="made from 8-px images, these are 16 px"):
        reference_mod.check_compatible(loaded, extractor, 16, "ref.npz")
    inception = load_extractor("inception", inception_weights=fake_inception, device="cpu")
    with pytest.raises(UserError, match=f"made with the feature extractor {extractor.name}"):
        reference_mod.check_compatible(loaded, inception, 8, "ref.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable"):
        reference_mod.resolve(str(tmp_path / "bad.npz"), extractor, resolution=8, batch_size=4)


def test_more_reference_features_than_stored_are_subsampled(monkeypatch, extractor_file):
    monkeypatch.setattr(reference_mod, "MAX_STORED_FEATURES", 10)
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(from_tensor(shapes(30), "thirty"), extractor, batch_size=8)
    all_features = extractor(shapes(30))[0].numpy()
    assert ref.count == 30 and len(ref.features) == 10
    np.testing.assert_allclose(ref.stats.mu, all_features.mean(0), rtol=1e-5, atol=1e-6)  # moments use all 30
    assert all(any(np.allclose(row, other) for other in all_features) for row in ref.features)


def test_cifar10_reference_loads_the_hub_data_set_at_the_samples_resolution(monkeypatch, extractor_file):
    """The real loading path of `--reference cifar10`, fed a local data set shaped like uoft-cs/cifar10."""
    import datasets

    pictures = shapes(6, resolution=32)
    local = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pictures], "label": [0, 1, 2, 3, 4, 5]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=6)}))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or local)
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.resolve("cifar10", extractor, resolution=8, batch_size=4)
    assert asked == [("uoft-cs/cifar10", "train")] and ref.count == 6 and ref.resolution == 8
    expected = extractor(torch.nn.functional.interpolate(pictures.float(), size=8, mode="area").round().byte())[0]
    # decoded with Lanczos, not area averaging: close, not equal
    np.testing.assert_allclose(ref.stats.mu, expected.numpy().mean(0), rtol=0.05, atol=0.1)


def test_unknown_reference_name_is_a_clear_error(monkeypatch, extractor_file):
    import datasets

    def no_such_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset 'cifar11' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_such_dataset)
    extractor = load_extractor(str(extractor_file), device="cpu")
    with pytest.raises(UserError, match="--reference cifar11: could not load data set 'cifar11'.*a reference is"):
        reference_mod.resolve("cifar11", extractor, resolution=8, batch_size=4)
