"""Generated bad files where commands read models, features, images, masks and configs: exit code 2, one
`difftool: error:` line, no traceback, no hang.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zipfile
from pathlib import Path

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from difftool.models.checkpoints import read_single_file_metadata
from difftool.rundir import PROGRESS_FILE, RunDir
from tests.cli.fuzz.conftest import (
    BROKEN_CONFIGS,
    CHECKPOINT_RECORD,
    JSON_VALUES,
    TEXT,
    WS,
    refused,
)
from tests.fuzzing import FUZZ


def _zip(members: dict[str, bytes]) -> bytes:
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        f.seek(0)
        return f.read()


def _safetensors_like(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


# A header of a safetensors file that holds no difftool UNet config (and usually is no valid header at all).
SAFETENSORS_HEADERS = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(TEXT.filter(lambda k: k != "__metadata__"), st.dictionaries(TEXT, JSON_VALUES, max_size=3),
                    max_size=3).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)
GARBAGE = st.one_of(
    st.binary(max_size=512),
    st.builds(_safetensors_like, SAFETENSORS_HEADERS, st.binary(max_size=64)),
    st.dictionaries(st.sampled_from(["arr_0.npy", "mu.npy", "data.pkl", "archive/data.pkl", "version", "x"]),
                    st.binary(max_size=64), min_size=1, max_size=3).map(_zip),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
SUFFIXES = [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".png", ".json", ".yaml", ""]


def _garbage_uses(path: str) -> list[list[str]]:
    """Every place a command takes a file, with `path` (garbage) there and valid inputs elsewhere."""
    valid = {"model": f"{WS}/cond.safetensors", "features": f"{WS}/features.pt", "images": f"{WS}/images.npz"}
    out = f"{WS}/cwd/out"
    return [
        ["sample", path, "-o", out, "-q"],
        ["inspect", path],
        ["convert", path, f"{out}.safetensors"],
        ["evaluate", path, "--features", valid["features"], "-o", out, "-q"],
        ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", path, "-o", f"{out}.png", "-q"],
        ["evaluate", valid["images"], "--features", path, "-o", out, "-q"],
        ["evaluate", valid["images"], "--inception-weights", path, "-o", out, "-q"],
        ["evaluate", valid["images"], "--reference", path, "--features", valid["features"], "-o", out, "-q"],
    ]


@given(data=GARBAGE, suffix=st.sampled_from(SUFFIXES), use=st.integers(0, len(_garbage_uses("x")) - 1))
@example(data=_zip({"x": b""}), suffix=".npz", use=3)  # a member that is no .npy: np.load gives bytes, not an array
@settings(FUZZ, max_examples=50)
def test_garbage_files_where_models_features_or_images_go(ws, data, suffix, use):
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        path = Path(tmp) / f"garbage{suffix}"
        path.write_bytes(data)
        refused(ws, _garbage_uses(str(path))[use])


@given(data=GARBAGE, suffix=st.sampled_from([".png", ".jpg", ".webp", ".bmp"]), which=st.sampled_from(["image", "mask"]))
@settings(FUZZ, max_examples=20)
def test_garbage_images_and_masks(ws, data, suffix, which):
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        path = Path(tmp) / f"garbage{suffix}"
        path.write_bytes(data)
        image, mask = (path, f"{WS}/mask.png") if which == "image" else (f"{WS}/image.png", path)
        refused(ws, ["inpaint", image, mask, "--model", f"{WS}/cond.safetensors", "-o", f"{tmp}/out.png", "-q"])


# ---------------------------------------------------------------- folders that are not models or runs


def _unet_config(ws: Path) -> dict:
    return read_single_file_metadata(ws / "cond.safetensors")["unet_config"]


@st.composite
def broken_model_folders(draw) -> dict[str, bytes | None]:
    """{relative path: contents} of a folder that looks like a model or run but cannot be one (None: the config)."""
    kind = draw(st.sampled_from(["unet config", "unet weights", "pipeline", "checkpoint"]))
    if kind == "unet config":  # config.json that is not a UNet2DModel's
        return {"config.json": draw(GARBAGE)}
    if kind == "unet weights":  # a real UNet config beside weights that are not weights
        name = draw(st.sampled_from(["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]))
        return {"config.json": None, name: draw(GARBAGE)}
    if kind == "pipeline":
        return {"model_index.json": draw(GARBAGE), "unet/config.json": draw(GARBAGE)}
    # a run whose only checkpoint has a damaged progress.json, or an intact one beside weights that are not weights
    checkpoint = "checkpoints/step-000003"
    files = {"config.yaml": yaml.safe_dump({"train": {"max_steps": 6}}).encode()}
    if draw(st.booleans()):
        files[f"{checkpoint}/{PROGRESS_FILE}"] = draw(GARBAGE)
    else:
        files[f"{checkpoint}/{PROGRESS_FILE}"] = json.dumps(CHECKPOINT_RECORD).encode()
        files[f"{checkpoint}/model.safetensors"] = draw(GARBAGE)
    return files


def _write_tree(root: Path, files: dict[str, bytes | None], ws: Path) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(json.dumps(_unet_config(ws)).encode() if data is None else data)


@given(files=broken_model_folders(), command=st.sampled_from(["sample", "inspect", "convert", "evaluate", "inpaint"]))
@example(files={"config.yaml": b"train:\n  max_steps: 6\n", f"checkpoints/step-000003/{PROGRESS_FILE}": b""},
         command="sample")  # progress.json that is not JSON
@example(files={"config.yaml": b"train:\n  max_steps: 6\n", f"checkpoints/step-000003/{PROGRESS_FILE}": b"[]"},
         command="sample")  # progress.json that is JSON but no record
@example(files={"config.json": b"null"}, command="inspect")  # a unet config.json that is no mapping
@settings(FUZZ, max_examples=30)
def test_broken_model_folders(ws, files, command):
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        folder = Path(tmp) / "model"
        _write_tree(folder, files, ws)
        argv = {
            "sample": ["sample", folder, "-o", f"{tmp}/out", "-q"],
            "inspect": ["inspect", folder],
            "convert": ["convert", folder, f"{tmp}/out.safetensors"],
            "evaluate": ["evaluate", folder, "--features", f"{WS}/features.pt", "-o", f"{tmp}/out", "-q"],
            "inpaint": ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", folder, "-o", f"{tmp}/x.png", "-q"],
        }[command]
        refused(ws, argv)


@given(config=BROKEN_CONFIGS, command=st.sampled_from(["sample", "inspect", "convert", "resume"]))
@example(config=b"\x80", command="sample")  # not UTF-8
@example(config=b"- just\n- a list\n", command="resume")  # not a mapping
@settings(FUZZ, max_examples=30)
def test_run_folders_with_a_broken_config(ws, config, command):
    """A run with a complete-looking checkpoint whose config.yaml is damaged (the config is read first)."""
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        run = RunDir(Path(tmp) / "run")
        run.checkpoint(3).mkdir(parents=True)
        (run.checkpoint(3) / PROGRESS_FILE).write_text(json.dumps(CHECKPOINT_RECORD))
        run.config.write_bytes(config)
        argv = {
            "sample": ["sample", run.root, "-o", f"{tmp}/out", "-q"],
            "inspect": ["inspect", run.root],
            "convert": ["convert", run.root, f"{tmp}/out.safetensors"],
            "resume": ["train", "--resume", run.root, "--dry-run"],
        }[command]
        refused(ws, argv)


# ---------------------------------------------------------------- train --dry-run
