"""evaluation/evaluate.py: scoring a set, and evaluating a model (sample, score, resume).

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from difftool.errors import UserError
from difftool.evaluation import reference as reference_mod
from difftool.evaluation.evaluate import (
    MetricOptions,
    build_stats,
    default_output,
    evaluate,
    score,
)
from difftool.evaluation.features import (
    load_extractor,
)
from difftool.evaluation.imagesets import from_tensor
from difftool.evaluation.metrics import frechet_distance, gaussian_stats
from difftool.output_rules import Existing
from difftool.sampling.job import SampleRequest
from tests.evaluation.conftest import shapes

runner = CliRunner()


# ---------------------------------------------------------------- scoring


def test_a_set_scored_against_itself(extractor_file):
    images = from_tensor(shapes(64), "shapes")
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(images, extractor, batch_size=16)
    record = score(images, ref, extractor, MetricOptions(kid_subset_size=32))
    assert abs(record["fd"]) < 1e-3  # float16 is only used for the stored features, not mu and sigma
    assert record["precision"] == 1.0 and record["recall"] == 1.0
    assert abs(record["kid_mean"]) < 3 * record["kid_std"] + 1e-6
    assert record["num_images"] == 64 and "is_mean" in record
    assert any("N = 64 images" in w for w in record["warnings"])


def test_score_matches_the_metric_functions(extractor_file):
    extractor = load_extractor(str(extractor_file), device="cpu")
    real, fake = from_tensor(shapes(64), "real"), from_tensor(shapes(40, seed_offset=100).flip(-1).roll(1, 1), "fake")
    ref = reference_mod.from_images(real, extractor, batch_size=64)
    record = score(fake, ref, extractor, MetricOptions())
    fake_features = extractor(torch.cat(list(fake.batches(64))))[0].numpy()
    expected = frechet_distance(gaussian_stats(fake_features), gaussian_stats(extractor(shapes(64))[0].numpy()))
    assert record["fd"] == pytest.approx(expected, rel=1e-6)
    assert record["fd"] > 0.1


# ---------------------------------------------------------------- evaluate / sweep on a model


def test_evaluate_a_model_samples_scores_and_resumes(tiny_run, tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    request = SampleRequest(num_images=12, steps=3, batch_size=5)
    result = evaluate(str(tiny_run), reference="shapes", options=options, request=request)
    assert result.output == Path("evaluations/run")
    record = json.loads((result.output / "metrics.json").read_text())
    assert record["num_images"] == 12 and record["sampling"]["steps"] == 3 and record["resolution"] == 8
    # 3 guided steps (the tiny recipe's guidance): each runs the network with and without the class
    assert record["sampling"]["model_calls"] == 6 and record["reference_images"] == 10_000
    assert {"fd", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"} <= set(record)
    with np.load(result.output / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 8, 8, 3)
    with pytest.raises(UserError, match="already holds an evaluation"):
        evaluate(str(tiny_run), reference="shapes", options=options, request=request)
    again = evaluate(str(tiny_run), reference="shapes", options=options, request=request, existing=Existing(resume=True))
    assert again.record["fd"] == pytest.approx(record["fd"], rel=1e-9)  # same samples, same score


def test_statistics_of_another_resolution_stop_before_sampling(tiny_run, tmp_path, extractor_file, monkeypatch):
    options = MetricOptions(features=str(extractor_file))
    build_stats("shapes", tmp_path / "ref16.npz", resolution=16, options=options)
    with pytest.raises(UserError, match="made from 16-px images, these are 8 px"):
        evaluate(str(tiny_run), reference=str(tmp_path / "ref16.npz"), options=options,
                 request=SampleRequest(num_images=4, steps=2), output=tmp_path / "ev")
    assert not (tmp_path / "ev" / "samples").exists()


def test_default_output_names():
    assert default_output("runs/cifar") == Path("evaluations/cifar")
    assert default_output("runs/cifar/model") == Path("evaluations/cifar")
    assert default_output("runs/cifar/checkpoints/step-000500") == Path("evaluations/cifar-step-000500")
    assert default_output("out/samples/ddim-50/samples.npz") == Path("evaluations/ddim-50")
    assert default_output("model.safetensors") == Path("evaluations/model")
