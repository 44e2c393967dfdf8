"""The ddpm-original importer against a re-implementation of pytorch_diffusion's `Model`.

`ReferenceModel` (ddpm_reference.py) follows pesser/pytorch_diffusion's model.py (itself checked against Ho et al.'s
TensorFlow code) with the same parameter names, so its state dict has the release's keys; the
converted UNet2DModel must give the same outputs for random weights.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from difftool.errors import UserError
from difftool.models.importers import ddpm_original
from tests.models.ddpm_reference import SMALL, reference

# Three levels, two res blocks, attention on the first level: up.0 becomes up_blocks.2.
DEEPER = {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,), "resolution": 16}


def load_unet(imported) -> UNet2DModel:
    unet = UNet2DModel(**imported.unet_config).eval()
    unet.load_state_dict(imported.state, strict=True)
    return unet


def inputs(resolution: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arguments", [SMALL, DEEPER], ids=["small", "deeper"])
def test_converted_unet_matches_the_original_model(arguments):
    original = reference(arguments)
    unet = load_unet(ddpm_original.convert(original.state_dict()))
    x = inputs(arguments["resolution"])
    with torch.no_grad():
        for t in ([0, 999], [17, 500]):
            t = torch.tensor(t)
            expected = original(x, t)
            assert expected.abs().mean() > 0.1  # a signal far above the tolerance
            torch.testing.assert_close(unet(x, t).sample, expected, rtol=1e-4, atol=1e-4)


def test_inferred_config():
    config = ddpm_original.convert(reference(DEEPER).state_dict()).unet_config
    assert config["block_out_channels"] == [32, 64, 64]
    assert config["layers_per_block"] == 2
    assert config["down_block_types"] == ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]
    assert (config["in_channels"], config["out_channels"]) == (3, 3)


def test_saved_and_reloaded_unet_gives_the_same_output(tmp_path):
    original = reference(SMALL)
    unet = load_unet(ddpm_original.convert(original.state_dict(), resolution=16))
    unet.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = UNet2DModel.from_pretrained(tmp_path).eval()
    x, t = inputs(16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t).sample, original(x, t), rtol=1e-4, atol=1e-4)


def test_detect():
    state = reference(SMALL).state_dict()
    assert ddpm_original.detect(state)
    assert ddpm_original.detect({"state_dict": state})
    assert not ddpm_original.detect(load_unet(ddpm_original.convert(state)).state_dict())
    assert not ddpm_original.detect({"model": {}})
    assert not ddpm_original.detect([torch.zeros(1)])


def test_wrapped_state_dict_converts_like_the_bare_one():
    state = reference(SMALL).state_dict()
    bare, wrapped = ddpm_original.convert(state), ddpm_original.convert({"state_dict": state})
    assert wrapped.unet_config == bare.unet_config
    assert wrapped.state.keys() == bare.state.keys()


def test_extra_key_is_named():
    state = reference(SMALL).state_dict()
    state["ema.decay"] = torch.tensor(0.9999)
    with pytest.raises(UserError, match=r"1 keys this importer does not know \(first: ema\.decay\)"):
        ddpm_original.convert(state)


def test_missing_key_is_named():
    state = reference(SMALL).state_dict()
    del state["up.1.attn.0.proj_out.bias"]
    with pytest.raises(UserError, match=r"1 keys missing \(first: up\.1\.attn\.0\.proj_out\.bias\)"):
        ddpm_original.convert(state)


def test_first_level_wider_than_conv_in_is_refused():
    state = reference({**SMALL, "ch_mult": (2, 2)}).state_dict()
    with pytest.raises(UserError, match="ch_mult"):
        ddpm_original.convert(state)


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_weights_choice_is_refused(weights):
    with pytest.raises(UserError, match=r"separate file \(ema_diffusion_"):
        ddpm_original.convert(reference(SMALL).state_dict(), weights=weights)


def test_scheduler_is_the_papers_linear_schedule():
    config = ddpm_original.convert(reference(SMALL).state_dict()).scheduler_config
    assert not any(key.startswith("_") for key in config)
    scheduler = DDPMScheduler.from_config(config)
    torch.testing.assert_close(scheduler.betas, torch.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-8)
    assert config["prediction_type"] == "epsilon"
    assert config["clip_sample"] is True
    assert config["variance_type"] == "fixed_small"


def test_resolution_is_a_noted_guess_unless_given():
    state = reference(SMALL).state_dict()  # attention on level 1: 16 px there means 32 px images
    guessed = ddpm_original.convert(state)
    assert guessed.unet_config["sample_size"] == 32
    assert len(guessed.notes) == 1 and "resolution 32" in guessed.notes[0]
    given = ddpm_original.convert(state, resolution=16)
    assert given.unet_config["sample_size"] == 16
    assert given.notes == []


def test_the_command_detects_converts_and_samples(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from difftool.cli.app import app

    monkeypatch.chdir(tmp_path)
    original = reference(SMALL)
    torch.save(original.state_dict(), "model-790000.ckpt")
    runner = CliRunner()
    for args in (["model-790000.ckpt", "auto"], ["model-790000.ckpt", "forced", "--from", "ddpm-original"]):
        result = runner.invoke(app, ["convert", *args])
        assert result.exit_code == 0, result.output
        assert "assumed" in result.stderr or "resolution" in result.stderr  # the resolution guess is said
    unet = UNet2DModel.from_pretrained(tmp_path / "auto" / "unet").eval()
    x, t = inputs(SMALL["resolution"]), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, original(x, t), rtol=1e-4, atol=1e-4)
    result = runner.invoke(app, ["convert", "model-790000.ckpt", "big", "--resolution", "64"])
    assert result.exit_code == 0, result.output
    assert UNet2DModel.load_config(tmp_path / "big" / "unet")["sample_size"] == 64
    result = runner.invoke(app, ["convert", "auto", "again", "--resolution", "64"])
    assert result.exit_code == 2 and "has its own" in result.stderr
    result = runner.invoke(app, ["sample", "auto", "-n", "2", "--steps", "2", "-o", "samples", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "000001.png").is_file()


def test_sample_and_inspect_read_the_checkpoint_through_the_one_loading_door(tmp_path, monkeypatch):
    """`difftool sample` and `inspect` accept what `convert` reads (issue 17): no convert step first."""
    from typer.testing import CliRunner

    from difftool.cli.app import app
    from difftool.models.load import load_model

    monkeypatch.chdir(tmp_path)
    torch.save(reference(SMALL).state_dict(), "model-790000.ckpt")
    loaded = load_model("model-790000.ckpt")
    assert loaded.info["converted_from"] == "ddpm-original:model-790000.ckpt"
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "model-790000.ckpt", "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", "model-790000.ckpt", "-n", "1", "--steps", "2", "-o", "samples", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "000000.png").is_file()
