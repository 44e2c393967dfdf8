"""Hostile weight files through every command that loads a model: tampered safetensors, configs and progress
records are one-line errors; pickles that would run code are refused, never run.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from difftool.errors import UserError
from difftool.models.export import save_single_file
from difftool.models.load import load_model
from tests.conftest import assert_user_error, invoke

UNET_WEIGHTS = Path("model/unet/diffusion_pytorch_model.safetensors")
CHECKPOINT_WEIGHTS = Path("checkpoints/step-000006/model.safetensors")

# ---------------------------------------------------------------- tampered safetensors


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


def offsets_beyond_the_file(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    entry = header[first_tensor(header)]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(body) + 64, len(body) + 64 + size]
    return with_header(header, body)


def shapes_larger_than_the_data(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header[first_tensor(header)]["shape"] = [4096, 4096]
    return with_header(header, body)


TAMPERED = {
    "data offsets beyond the file": offsets_beyond_the_file,
    "shapes larger than their data": shapes_larger_than_the_data,
    "header length beyond the file": lambda data: struct.pack("<Q", len(data) * 10) + data[8:],
    "header length 2**64 - 1": lambda data: b"\xff" * 8 + data[8:],
    "header not JSON": lambda data: data[:8] + b"\xff" * struct.unpack("<Q", data[:8])[0]
                                    + data[8 + struct.unpack("<Q", data[:8])[0] :],
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
}


def tamper(path: Path, kind: str) -> Path:
    path.write_bytes(TAMPERED[kind](path.read_bytes()))
    return path


@pytest.fixture
def single_file(tiny_run, tmp_path) -> Path:
    model = load_model(tiny_run)
    path = tmp_path / "model.safetensors"
    save_single_file(path, model.unet, model.scheduler_config, model.info)
    return path


COMMANDS = {
    "sample": lambda source: ["sample", source, "-n", "1", "--steps", "2", "-o", "samples", "-q"],
    "inspect": lambda source: ["inspect", source],
    "convert": lambda source: ["convert", source, "converted"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", TAMPERED)
def test_tampered_single_file_is_one_line_from_every_command(single_file, kind, command):
    tamper(single_file, kind)
    assert_user_error(invoke(*COMMANDS[command](single_file)), f"{single_file} is not a readable safetensors file (")
    assert not Path("converted").exists() and not list(Path().glob("samples/*.png"))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["data offsets beyond the file", "header not JSON", "truncated"])
@pytest.mark.parametrize("weights", [UNET_WEIGHTS, CHECKPOINT_WEIGHTS])
def test_tampered_weights_in_a_run_folder_are_one_line_from_every_command(tiny_run, tmp_path, weights, kind, command):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    tamper(run / weights, kind)
    if weights == CHECKPOINT_WEIGHTS:  # raw weights of a run whose training has not finished
        shutil.rmtree(run / "model")
        args = [*COMMANDS[command](run), "--weights", "raw"]
    else:
        args = COMMANDS[command](run)
    assert_user_error(invoke(*args), f"{run / weights} is not a readable safetensors file (")


def rewrite_metadata(path: Path, **changes: str) -> Path:
    with safetensors.safe_open(path, "pt") as f:
        metadata = {**f.metadata(), **changes}
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata=metadata)
    return path


def edited(text: str, **changes) -> str:
    return json.dumps({**json.loads(text), **changes})


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: {"unet_config": "[]"}, "damaged difftool metadata (unet_config: not a JSON object)"),
    (lambda m: {"difftool": "5"}, "damaged difftool metadata (info: not a JSON object)"),
    (lambda m: {"difftool": edited(m["difftool"], resolution="x")}, "is damaged: it records resolution='x'"),
    (lambda m: {"difftool": edited(m["difftool"], label_names=5)}, "is damaged: it records label_names=5"),
    (lambda m: {"unet_config": edited(m["unet_config"], norm_num_groups=0)}, "diffusers cannot build the UNet2DModel"),
    # Channels a million wide: 17 TB of weights if the UNet were built before its weights are read.
    (lambda m: {"unet_config": edited(m["unet_config"], block_out_channels=[2**20, 2**20], norm_num_groups=1)},
     "do not match its config"),
    (lambda m: {"scheduler_config": edited(m["scheduler_config"], num_train_timesteps="x")},
     "does not make a DDPMScheduler"),
])
def test_tampered_single_file_metadata_is_a_user_error(single_file, change, expected):
    with safetensors.safe_open(single_file, "pt") as f:
        metadata = f.metadata()
    rewrite_metadata(single_file, **change(metadata))
    assert_user_error(invoke("inspect", single_file), str(single_file), expected)


@pytest.mark.parametrize(("file", "text", "expected"), [
    ("model/unet/config.json", b"[]", "holds a JSON list, not an object of settings"),
    ("model/unet/config.json", b"\xff\xfe{}", "'utf-8' codec can't decode"),
    ("model/scheduler/scheduler_config.json", b'{"num_train_timesteps": -5}', "does not make a DDPMScheduler"),
    ("model/difftool.json", b'{"resolution": 0}', "is damaged: it records resolution=0"),
])
def test_tampered_configs_in_a_run_folder_are_user_errors(tiny_run, tmp_path, file, text, expected):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / file).write_bytes(text)
    with pytest.raises(UserError) as err:
        load_model(run)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "expected"), [
    (b"[]", "it holds a JSON list, not an object"),
    (b'{"step": 6, "resolution": 8, "channels": -3, "num_classes": 5}', "it records channels=-3"),
])
def test_a_damaged_progress_record_of_an_unfinished_run_is_a_user_error(tiny_run, tmp_path, text, expected):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    shutil.rmtree(run / "model")
    (run / "checkpoints" / "step-000006" / "progress.json").write_bytes(text)
    assert_user_error(invoke("inspect", run), "progress.json is damaged", expected)


# ---------------------------------------------------------------- pickles


class RunsCode:
    """A pickle that would run a shell command when loaded by a plain torch.load."""

    def __reduce__(self):
        return (os.system, (f"touch {Path('pwned').resolve()}",))


@pytest.fixture
def unet_with_bin_weights(tiny_run, tmp_path) -> Path:
    folder = Path(shutil.copytree(tiny_run / "model" / "unet", tmp_path / "unet"))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("command", COMMANDS)
def test_bin_weights_that_would_run_code_are_refused_by_every_command(unet_with_bin_weights, command):
    torch.save({"conv_in.weight": RunsCode()}, unet_with_bin_weights / "diffusion_pytorch_model.bin")
    assert_user_error(invoke(*COMMANDS[command](unet_with_bin_weights)), "diffusion_pytorch_model.bin needs code to load",
                      "GLOBAL", "never runs code")
    assert not Path("pwned").exists()


@pytest.mark.parametrize(("content", "expected"), [
    (b"garbage", "is not a readable PyTorch checkpoint (UnpicklingError: Unsupported operand"),
    ([1, 2], "does not hold a state dict"),
    ({"conv_in.weight": 3}, "does not hold a state dict"),
])
def test_bin_weights_that_are_not_a_state_dict(unet_with_bin_weights, content, expected):
    path = unet_with_bin_weights / "diffusion_pytorch_model.bin"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert_user_error(invoke("inspect", unet_with_bin_weights), str(path), expected)


def test_every_torch_load_in_the_library_runs_no_code():
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, no pickle.load at all."""
    unsafe = []
    for path in sorted(Path(__file__).parents[2].joinpath("difftool").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            options = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if ((owner, node.func.attr) == ("torch", "load") and options.get("weights_only") is not True
                    or (owner, node.func.attr) == ("np", "load") and options.get("allow_pickle", False) is not False
                    or owner == "pickle" and node.func.attr in ("load", "loads")):
                unsafe.append(f"{path.name}:{node.lineno}")
    assert unsafe == []


@pytest.mark.slow
def test_resuming_never_runs_code_from_a_checkpoint(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    state = run / "checkpoints" / "step-000006" / "custom_checkpoint_0.pkl"
    torch.save({"payload": RunsCode()}, state)
    assert_user_error(invoke("train", "--resume", run, "--max-steps", "8", "-q"), f"{state} needs code to load")
    assert not Path("pwned").exists()
