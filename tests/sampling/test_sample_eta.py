"""sample.eta: a recipe's (or a distilled model's) sampler noise, used wherever the model samples with that sampler."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from difftool.config import SampleConfig, load_config
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.sampling.defaults import sampling_defaults
from difftool.sampling.settings import resolve_sampler
from difftool.training.loop import train
from tests.conftest import invoke, tiny_config


def test_the_recipe_s_eta_goes_with_the_recipe_s_sampler_only(tiny_run):
    model = load_model(tiny_run)
    recipe = SampleConfig(scheduler="ddim", steps=3, eta=1.0)
    resolve = lambda **asked: resolve_sampler(model.info, model.scheduler_config, recipe, seed=0, **asked)  # noqa: E731
    assert resolve().eta == 1.0
    assert resolve(eta=0.0).eta == 0.0, "asked for, it wins"
    assert resolve(scheduler="dpm-solver").eta is None, "another sampler keeps its own noise"
    assert resolve(scheduler="ddim", steps=5).eta == 1.0, "the same sampler asked by name"


def with_recipe_eta(run, tmp_path):
    """A copy of the run whose recipe samples with DDIM at eta 1."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["sample"].update(scheduler="ddim", steps=3, eta=1.0)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def sampled(run, out, *options) -> np.ndarray:
    result = invoke("sample", run, "-n", "4", "--format", "npz", "--output", out, "--quiet", *options)
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as saved:
        return saved["arr_0"]


def test_sample_with_no_flags_uses_the_recipe_s_eta(tiny_run, tmp_path):
    run = with_recipe_eta(tiny_run, tmp_path)
    plain = sampled(run, tmp_path / "plain")
    assert np.array_equal(plain, sampled(run, tmp_path / "eta1", "--eta", "1"))
    assert not np.array_equal(plain, sampled(run, tmp_path / "eta0", "--eta", "0")), "eta 1 is not DDIM's default"


def test_an_exported_model_carries_its_eta(tmp_path):
    """model/difftool.json records it, so a copy of model/ away from its run samples as the recipe said."""
    from types import SimpleNamespace

    from difftool.models.export import model_info

    cfg = load_config("quickstart", ["sample.scheduler=ddim", "sample.eta=0.5"])
    info = model_info(cfg, SimpleNamespace(channels=3, label_names=None), 0)
    assert info["sample"]["eta"] == 0.5
    recorded = sampling_defaults(tmp_path / "elsewhere", info)
    assert (recorded.scheduler, recorded.eta) == ("ddim", 0.5)


@pytest.mark.parametrize("setting, message", [
    ("sample.eta=1.5", "sample.eta must be in [0, 1]"),
])
def test_an_eta_out_of_range_is_refused(setting, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config("quickstart", [setting])


@pytest.mark.parametrize("settings, message", [
    (["sample.scheduler=dpm-solver", "sample.eta=1"], "sample.eta applies to ddim, tcd only, not sample.scheduler=dpm"),
    (["sample.scheduler=ddmi"], "unknown scheduler 'ddmi'"),
])
def test_a_preview_sampler_that_cannot_run_is_refused_before_anything_is_written(tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(*settings), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused at the start, not at the first preview grid"
