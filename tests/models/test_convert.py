"""`difftool convert` and `difftool inspect` on the tiny run: every source and target, round trips, bad files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from difftool.models.load import load_model
from tests.conftest import assert_user_error, invoke

pytestmark = pytest.mark.usefixtures("scratch_cwd")


@pytest.fixture(scope="module")
def sources(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """One of every source kind, all holding the tiny run's EMA weights."""
    root = tmp_path_factory.mktemp("sources")
    bin_folder = root / "bin_unet"
    shutil.copytree(tiny_run / "model" / "unet", bin_folder)
    weights = bin_folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), bin_folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    single = root / "model.safetensors"
    assert invoke("convert", tiny_run / "model", single).exit_code == 0
    return {
        "run": tiny_run,
        "checkpoint": tiny_run / "checkpoints" / "step-000006",
        "pipeline": tiny_run / "model",
        "unet": tiny_run / "model" / "unet",
        "single": single,
        "bin": bin_folder / "diffusion_pytorch_model.bin",
    }


TARGETS = {"pipeline": "out", "unet": "out_unet", "single": "out.safetensors"}


@pytest.mark.parametrize("target_kind", list(TARGETS))
@pytest.mark.parametrize("source_kind", ["run", "checkpoint", "pipeline", "unet", "single", "bin"])
def test_every_source_into_every_target(sources, tiny_run, source_kind, target_kind):
    target = Path(TARGETS[target_kind])
    args = ["convert", sources[source_kind], target] + (["--to", "unet"] if target_kind == "unet" else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    expected = load_model(tiny_run / "model").model_hash  # the EMA weights, wherever they came from
    assert load_model(target).model_hash == expected
    if target_kind == "pipeline":
        pipe = DDPMPipeline.from_pretrained(target)  # plain diffusers reads it
        assert pipe.unet.config.sample_size == 8


def test_folder_to_single_file_and_back_is_bit_exact(tiny_run):
    assert invoke("convert", tiny_run / "model", "one.safetensors").exit_code == 0
    assert invoke("convert", "one.safetensors", "back").exit_code == 0
    original, back = tiny_run / "model", Path("back")
    a = load_file(original / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(back / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    def config(path):
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "_diffusers_version"}

    assert config(back / "unet" / "config.json") == config(original / "unet" / "config.json")
    assert config(back / "scheduler" / "scheduler_config.json") == config(original / "scheduler" / "scheduler_config.json")
    assert json.loads((back / "difftool.json").read_text()) == json.loads((original / "difftool.json").read_text())


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_casting(tiny_run, dtype, torch_dtype):
    assert invoke("convert", tiny_run / "model", "half.safetensors", "--dtype", dtype).exit_code == 0
    half = load_model("half.safetensors").unet
    full = load_model(tiny_run / "model").unet
    assert {p.dtype for p in half.parameters()} == {torch_dtype}
    for (name, p), q in zip(half.state_dict().items(), full.state_dict().values(), strict=True):
        assert torch.equal(p, q.to(torch_dtype)), name


def test_single_files_get_the_usual_permissions(tiny_run):
    assert invoke("convert", tiny_run, "shared.safetensors").exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert Path("shared.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_weights_choice(tiny_run):
    assert invoke("convert", tiny_run, "raw.safetensors", "--weights", "raw").exit_code == 0
    assert invoke("convert", tiny_run, "ema.safetensors", "--weights", "ema").exit_code == 0
    assert load_model("raw.safetensors").model_hash == load_model(tiny_run / "model", weights="raw").model_hash
    assert load_model("ema.safetensors").model_hash == load_model(tiny_run / "model").model_hash
    assert load_model("raw.safetensors").model_hash != load_model("ema.safetensors").model_hash


def test_existing_targets_are_kept_unless_overwrite(tiny_run):
    Path("taken.safetensors").write_bytes(b"mine")
    assert_user_error(invoke("convert", tiny_run, "taken.safetensors"), "already exists", "--overwrite")
    assert Path("taken.safetensors").read_bytes() == b"mine"
    assert invoke("convert", tiny_run, "taken.safetensors", "--overwrite").exit_code == 0
    assert load_model("taken.safetensors").model_hash == load_model(tiny_run).model_hash


class RunsCode:
    """A pickle that would run a shell command when loaded by a plain torch.load."""

    def __reduce__(self):
        return (os.system, (f"touch {Path('pwned').resolve()}",))


def test_code_executing_pickles_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2), "payload": RunsCode()}, "evil.pt")
    assert_user_error(invoke("convert", "evil.pt", "out"), "evil.pt needs code to load", "GLOBAL", "never runs code")
    assert not Path("pwned").exists()
    assert not Path("out").exists()


def test_corrupt_and_foreign_files(tiny_run):
    data = (tiny_run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    Path("cut.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(invoke("convert", "cut.safetensors", "out"), "cut.safetensors")
    Path("notes.pt").write_text("just text")
    assert_user_error(invoke("convert", "notes.pt", "out"), "not a readable PyTorch checkpoint")
    torch.save({"some.weight": torch.zeros(3)}, "other.pt")
    assert_user_error(invoke("convert", "other.pt", "out"), "not a checkpoint difftool knows", "--from")
    assert_user_error(invoke("convert", tiny_run, "out", "--from", "keras"), "unknown --from 'keras'")
    assert_user_error(invoke("convert", tiny_run, "out", "--dtype", "fp8"), "unknown --dtype")
    assert_user_error(invoke("convert", tiny_run, "out", "--to", "single"), "ending in .safetensors")
    assert not Path("out").exists(), "nothing half-written"


def test_state_dict_that_does_not_fit_its_config(tiny_run):
    folder = Path("bad_unet")
    shutil.copytree(tiny_run / "model" / "unet", folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state["conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    assert_user_error(invoke("convert", folder / "diffusion_pytorch_model.bin", "out"), "do not match its config",
                      "conv_in.weight")


def test_inspect_table_and_json(tiny_run):
    result = invoke("inspect", tiny_run)
    assert result.exit_code == 0, result.output
    for row in ("parameters", "model hash", "prediction type", "size on disk", "circle"):
        assert row in result.stdout
    report = json.loads(invoke("inspect", tiny_run, "--json").stdout)
    model = load_model(tiny_run)
    assert report["parameters"] == sum(p.numel() for p in model.unet.parameters())
    assert report["model_hash"] == model.model_hash and report["weights"] == "ema"
    assert report["resolution"] == 8 and report["classes"] == ["circle", "square", "triangle", "ring", "cross"]
    assert report["timesteps"] == 50 and report["step"] == 6 and report["dtype"] == "float32"
    raw = json.loads(invoke("inspect", tiny_run, "--weights", "raw", "--json").stdout)
    assert raw["model_hash"] != report["model_hash"]
    assert_user_error(invoke("inspect", "missing-model"), "does not exist")
