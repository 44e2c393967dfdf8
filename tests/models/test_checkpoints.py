"""load_model on every kind of source, the single-file format, and the errors users see."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import constants as hub_constants

from difftool.config import read_config
from difftool.errors import UserError
from difftool.models.build import build_noise_scheduler
from difftool.models.checkpoints import read_single_file_metadata, state_dict_hash
from difftool.models.export import INFO_FILE, save_single_file
from difftool.models.load import load_model

WEIGHTS = "diffusion_pytorch_model.safetensors"
INFO_KEYS = {"resolution", "channels", "num_classes", "label_names", "null_class"}


def assert_weights(unet, path: Path) -> None:
    """The model holds exactly the tensors stored in `path`."""
    stored = safetensors.torch.load_file(path)
    loaded = unet.state_dict()
    assert loaded.keys() == stored.keys()
    for key, tensor in stored.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def user_error(source, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        load_model(source, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def training_betas(run: Path) -> torch.Tensor:
    return build_noise_scheduler(read_config(run / "config.yaml").scheduler).betas


def without_ema(run: Path) -> Path:
    """Turn a copied run into one trained with ema.enabled=false (the layout such a run writes)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["ema"]["enabled"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint / "unet_ema")
    shutil.rmtree(run / "model" / "unet_raw")
    return run


def rewrite_weights(path: Path, change) -> None:
    state = safetensors.torch.load_file(path)
    change(state)
    safetensors.torch.save_file(state, path)


# ---------------------------------------------------------------- run folders and checkpoints


def test_run_folder_gives_the_exported_ema_weights(tiny_run):
    model = load_model(tiny_run)
    assert_weights(model.unet, tiny_run / "model" / "unet" / WEIGHTS)
    assert model.weights == "ema" and model.notes == []
    assert model.source == f"{tiny_run / 'model'} (EMA weights)"
    assert not model.unet.training
    assert INFO_KEYS <= model.info.keys()
    assert model.info["num_classes"] == 5 and model.info["null_class"] == 5 and model.info["step"] == 6
    assert model.info["label_names"] == ["circle", "square", "triangle", "ring", "cross"]
    assert model.model_hash == state_dict_hash(safetensors.torch.load_file(tiny_run / "model" / "unet" / WEIGHTS))


def test_raw_weights_of_a_run_come_from_unet_raw(tiny_run):
    model = load_model(tiny_run, weights="raw")
    assert_weights(model.unet, tiny_run / "model" / "unet_raw" / WEIGHTS)
    assert model.weights == "raw" and model.source.endswith("(raw weights)")
    assert model.model_hash != load_model(tiny_run).model_hash


@pytest.mark.parametrize("part", ["", "checkpoints/step-000003", "model", "model/unet"])
def test_scheduler_config_reproduces_the_training_betas(tiny_run, part):
    model = load_model(tiny_run / part)
    torch.testing.assert_close(DDPMScheduler.from_config(model.scheduler_config).betas, training_betas(tiny_run),
                               rtol=0, atol=0)
    assert model.scheduler_config["num_train_timesteps"] == 50
    assert not any(key.startswith("_") for key in model.scheduler_config)


def test_exported_model_still_loads_in_plain_diffusers(tiny_run):
    pipe = DDPMPipeline.from_pretrained(tiny_run / "model")
    assert state_dict_hash(pipe.unet.state_dict()) == load_model(tiny_run).model_hash


def test_unfinished_run_uses_its_latest_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    shutil.rmtree(run / "model")
    model = load_model(run)
    assert_weights(model.unet, run / "checkpoints" / "step-000006" / "unet_ema" / WEIGHTS)
    assert model.weights == "ema" and model.info["step"] == 6
    assert len(model.notes) == 1
    assert "training has not finished" in model.notes[0] and "step-000006 (EMA weights)" in model.notes[0]


def test_model_older_than_the_latest_checkpoint_gives_way(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    info = json.loads((run / "model" / INFO_FILE).read_text())
    (run / "model" / INFO_FILE).write_text(json.dumps({**info, "step": 4}))
    model = load_model(run)
    assert_weights(model.unet, run / "checkpoints" / "step-000006" / "unet_ema" / WEIGHTS)
    assert "from step 4" in model.notes[0] and "step-000006" in model.notes[0]


def test_checkpoint_folder_holds_ema_and_raw_weights(tiny_run):
    checkpoint = tiny_run / "checkpoints" / "step-000006"
    ema = load_model(checkpoint)
    raw = load_model(checkpoint, weights="raw")
    assert_weights(ema.unet, checkpoint / "unet_ema" / WEIGHTS)
    assert_weights(raw.unet, checkpoint / "model.safetensors")
    assert (ema.weights, raw.weights) == ("ema", "raw")
    assert raw.source == f"{checkpoint} (raw weights)"
    # The final checkpoint and the exported model are the same weights in other containers.
    assert ema.model_hash == load_model(tiny_run).model_hash
    assert raw.model_hash == load_model(tiny_run, weights="raw").model_hash
    assert ema.info["step"] == 6 and ema.info["label_names"] == load_model(tiny_run).info["label_names"]
    assert load_model(tiny_run / "checkpoints" / "step-000003").info["step"] == 3


def test_wrapped_model_keys_are_unwrapped(tiny_run, tmp_path):
    """accelerate stores DDP (module.) and torch.compile (_orig_mod.) keys as they are."""
    checkpoint = copy_run(tiny_run, tmp_path) / "checkpoints" / "step-000006"
    expected = load_model(checkpoint, weights="raw").model_hash

    def wrap(state):
        for key in list(state):
            state[f"_orig_mod.module.{key}"] = state.pop(key)

    rewrite_weights(checkpoint / "model.safetensors", wrap)
    assert load_model(checkpoint, weights="raw").model_hash == expected


def test_run_trained_without_ema_has_raw_weights_only(tiny_run, tmp_path):
    run = without_ema(copy_run(tiny_run, tmp_path))
    checkpoint = run / "checkpoints" / "step-000006"
    from_checkpoint = load_model(checkpoint)
    assert_weights(from_checkpoint.unet, checkpoint / "model.safetensors")
    assert from_checkpoint.weights == "raw" and from_checkpoint.source.endswith("(raw weights)")
    assert list(from_checkpoint.unet.config.block_out_channels) == [8, 16]  # rebuilt from config.yaml
    from_model = load_model(run, weights="raw")
    assert_weights(from_model.unet, run / "model" / "unet" / WEIGHTS)
    assert from_model.weights == "raw"
    for source in (run, checkpoint):
        assert "has no EMA weights" in user_error(source, weights="ema")


# ---------------------------------------------------------------- diffusers folders


def test_pipeline_without_difftool_json_derives_its_info(tiny_run, tmp_path):
    pipeline = Path(shutil.copytree(tiny_run / "model", tmp_path / "pipe"))
    (pipeline / INFO_FILE).unlink()
    model = load_model(pipeline)
    assert_weights(model.unet, pipeline / "unet" / WEIGHTS)
    assert model.info == {"resolution": 8, "channels": 3, "num_classes": 6, "label_names": None, "null_class": None}
    assert model.weights == "ema" and model.source == str(pipeline) and model.notes == []
    assert "raw weights come with difftool run folders" in user_error(pipeline, weights="raw")


def test_unet_folder_uses_the_scheduler_and_info_beside_it(tiny_run):
    model = load_model(tiny_run / "model" / "unet")
    assert model.notes == [] and model.info["null_class"] == 5
    assert model.model_hash == load_model(tiny_run).model_hash


def test_unet_folder_alone_assumes_the_default_scheduler(tiny_run, tmp_path):
    unet = Path(shutil.copytree(tiny_run / "model" / "unet", tmp_path / "unet"))
    model = load_model(unet)
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.scheduler_config["beta_schedule"] == "linear"
    assert len(model.notes) == 1 and "assuming the DDPMScheduler defaults" in model.notes[0]
    assert model.info["resolution"] == 8 and model.info["label_names"] is None


def test_unet_folder_with_bin_weights(tiny_run, tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    shutil.copy(tiny_run / "model" / "unet" / "config.json", unet)
    torch.save(safetensors.torch.load_file(tiny_run / "model" / "unet" / WEIGHTS), unet / "diffusion_pytorch_model.bin")
    assert load_model(unet).model_hash == load_model(tiny_run).model_hash


# ---------------------------------------------------------------- single file and hashes


@pytest.mark.parametrize(("part", "weights"), [("", None), ("checkpoints/step-000003", "raw")])
def test_single_file_round_trip(tiny_run, tmp_path, part, weights):
    original = load_model(tiny_run / part, weights=weights)
    path = tmp_path / "model.safetensors"
    save_single_file(path, original.unet, original.scheduler_config, original.info)
    copy = load_model(path)
    for key, tensor in original.unet.state_dict().items():
        assert torch.equal(copy.unet.state_dict()[key], tensor), key
    assert dict(copy.unet.config) == dict(original.unet.config)
    assert copy.scheduler_config == original.scheduler_config
    assert copy.info == original.info
    assert copy.model_hash == original.model_hash
    assert copy.source == str(path) and copy.weights == "ema"
    assert read_single_file_metadata(path)["info"] == original.info
    assert not list(tmp_path.glob(".tmp-*"))


def test_single_file_keeps_the_stored_dtype(tiny_run, tmp_path):
    original = load_model(tiny_run)
    path = tmp_path / "bf16.safetensors"
    save_single_file(path, original.unet.to(torch.bfloat16), original.scheduler_config, original.info)
    copy = load_model(path)
    assert copy.unet.dtype == torch.bfloat16
    assert copy.model_hash == state_dict_hash(original.unet.state_dict()) != load_model(tiny_run).model_hash


def test_state_dict_hash_sees_every_weight_and_dtype(tiny_run):
    state = load_model(tiny_run).unet.state_dict()
    same = {k: v.clone() for k, v in state.items()}
    assert state_dict_hash(same) == state_dict_hash(state)
    changed = dict(same, **{"conv_in.bias": same["conv_in.bias"].clone()})
    changed["conv_in.bias"][0] += 1e-6
    assert state_dict_hash(changed) != state_dict_hash(state)
    assert state_dict_hash(dict(same, **{"conv_in.bias": same["conv_in.bias"].double()})) != state_dict_hash(state)
    assert state_dict_hash({"a": torch.zeros(2, 3)}) != state_dict_hash({"a": torch.zeros(3, 2)})


# ---------------------------------------------------------------- the hub


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable on import
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    message = user_error("nobody-here/no-such-model")
    assert time.perf_counter() - start < 5
    assert "cannot download 'nobody-here/no-such-model' from the Hugging Face Hub" in message
    assert "HF_HUB_OFFLINE" in message and "give a local path" in message


def test_hub_id_loads_the_downloaded_pipeline(tiny_run, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, *, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_run / "model")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    model = load_model("someone/tiny-ddpm@v1")
    assert model.source == "someone/tiny-ddpm@v1 (EMA weights)"
    assert model.model_hash == load_model(tiny_run).model_hash
    assert [(repo, revision) for repo, revision, _ in calls] == [("someone/tiny-ddpm", "v1")]
    patterns = calls[0][2]
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "scheduler/scheduler_config.json" in patterns
    assert not any(p.endswith(".bin") for p in patterns)


def test_hub_repo_with_bin_weights_only_is_fetched_again(tiny_run, tmp_path, monkeypatch):
    repo = tmp_path / "snapshot"
    (repo / "unet").mkdir(parents=True)
    shutil.copy(tiny_run / "model" / "model_index.json", repo)
    shutil.copytree(tiny_run / "model" / "scheduler", repo / "scheduler")
    shutil.copy(tiny_run / "model" / "unet" / "config.json", repo / "unet")
    torch.save(safetensors.torch.load_file(tiny_run / "model" / "unet" / WEIGHTS),
               repo / "unet" / "diffusion_pytorch_model.bin")
    patterns = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, *, revision, allow_patterns: patterns.append(allow_patterns) or str(repo))
    monkeypatch.chdir(tmp_path)
    assert load_model("someone/old-format").model_hash == load_model(tiny_run).model_hash
    assert len(patterns) == 2 and "unet/diffusion_pytorch_model.bin" in patterns[1]


def test_missing_path_under_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("no download expected"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    message = user_error("runs/typo")
    assert message.startswith("runs/typo does not exist") and "not taken for a Hub id" in message


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    assert user_error(tmp_path / "nowhere" / "model") == f"{tmp_path / 'nowhere' / 'model'} does not exist"


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_text("hello")])
def test_not_a_model(tmp_path, make):
    make(tmp_path / "thing")
    message = user_error(tmp_path / "thing")
    assert message.startswith(f"{tmp_path / 'thing'} is not a model: expected a run folder, a diffusers pipeline")
    assert "single-file .safetensors, or a hub id" in message


def test_run_without_checkpoints(tiny_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-000003").mkdir(parents=True)  # an interrupted, incomplete checkpoint
    shutil.copy(tiny_run / "config.yaml", run)
    message = user_error(run)
    assert message.startswith(f"{run} has no model yet: training has not saved a checkpoint")
    assert "checkpoint.every" in message


@pytest.mark.parametrize("weights", ["best", "EMA", ""])
def test_unknown_weights_choice(tiny_run, weights):
    assert "must be 'ema' or 'raw'" in user_error(tiny_run, weights=weights)


def test_raw_weights_from_single_weight_sources(tiny_run, tmp_path):
    path = tmp_path / "m.safetensors"
    model = load_model(tiny_run)
    save_single_file(path, model.unet, model.scheduler_config, model.info)
    for source in (path, tiny_run / "model" / "unet"):
        assert "not separate raw ones" in user_error(source, weights="raw")


def test_safetensors_without_difftool_metadata(tiny_run, tmp_path):
    path = tmp_path / "plain.safetensors"
    shutil.copy(tiny_run / "model" / "unet" / WEIGHTS, path)
    message = user_error(path)
    assert message == (f"{path} has no UNet config in its metadata; give the folder with config.json, "
                       f"or make a single file with `difftool convert`")


def test_single_file_of_a_newer_format(tiny_run, tmp_path):
    path = tmp_path / "new.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, path, metadata={"difftool_format": "unet/2", "unet_config": "{}"})
    assert "upgrade difftool" in user_error(path)


def test_truncated_safetensors(tiny_run, tmp_path):
    model = load_model(tiny_run)
    single = tmp_path / "m.safetensors"
    save_single_file(single, model.unet, model.scheduler_config, model.info)
    unet = Path(shutil.copytree(tiny_run / "model" / "unet", tmp_path / "unet"))
    for path in (single, unet / WEIGHTS):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    assert user_error(single).startswith(f"{single} is not a readable safetensors file (")
    assert user_error(unet).startswith(f"{unet / WEIGHTS} is not a readable safetensors file (")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda s: s.pop("conv_in.bias"), "1 missing keys (first: conv_in.bias)"),
    (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected (first: extra)"),
    (lambda s: s.update({"conv_in.bias": torch.zeros(3)}), "1 shape mismatches (first: conv_in.bias [3] vs [8])"),
])
def test_weights_that_do_not_match_their_config(tiny_run, tmp_path, change, expected):
    unet = Path(shutil.copytree(tiny_run / "model" / "unet", tmp_path / "unet"))
    rewrite_weights(unet / WEIGHTS, change)
    message = user_error(unet)
    assert message == f"weights in {unet / WEIGHTS} do not match its config: {expected}"


def test_folder_of_another_model_class(tiny_run, tmp_path):
    unet = Path(shutil.copytree(tiny_run / "model" / "unet", tmp_path / "unet"))
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    assert "holds a UNet2DConditionModel, not a UNet2DModel" in user_error(unet)
