"""Generated bad input for every command: exit code 2, one `difftool: error:` line, no traceback, no hang.

Every generated case is invalid by construction (each strategy says why), so 2 is the only right exit
code. The commands run in process through CliRunner; a few also through the installed executable.
Hypothesis runs derandomized and without an example database: every run, here and in CI, tries the
same inputs. A failure prints the argv; run it with `difftool --debug ...` for the traceback.

Paths in the generated argv are written `{ws}/NAME`, under the module's workspace, which holds a tiny
class-conditional and an unconditional model, a feature extractor and a few images. No in-process argv
names a hub id or a data set name: offline those fail fast, online they would download (the one hub id,
given to the executable, runs with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import struct
import subprocess
import tempfile
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from difftool.models.checkpoints import read_single_file_metadata
from difftool.models.export import save_single_file
from difftool.cli.app import app
from difftool.cli.options import IMAGES_MAX, SEED_MAX
from difftool.config import field_paths, recipe_names
from difftool.models.build import build_noise_scheduler, build_unet
from difftool.rundir import PROGRESS_FILE, RunDir
from difftool.sampling.schedulers import SCHEDULERS, SPACINGS, supports_karras
from tests.conftest import _TupleExtractor, difftool_cmd, tiny_config

runner = CliRunner()
WS = "{ws}"  # replaced by the workspace folder when a case runs
HANG_SECONDS = 120  # a guard against hangs only: a refusal takes well under a second
TIMESTEPS = 50  # scheduler.num_train_timesteps of the tiny models (conftest)
CLASSES = ("circle", "square", "ring")
COMMANDS = dict(get_command(app).commands)
SCHEDULER_NAMES = {name for spec in SCHEDULERS for name in (spec.name, *spec.aliases)}
CHECKPOINT_RECORD = {"step": 3, "resolution": 8, "channels": 3, "num_classes": None}  # a checkpoint's progress.json

# suppress function_scoped_fixture: the only function-scoped fixtures used (the working folder, the
# environment) are meant to stay as they are for all examples of a test.
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- workspace and runner


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Valid inputs for the cases that must get past one check to reach the bad one."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config()
    scheduler = {k: v for k, v in build_noise_scheduler(cfg.scheduler).config.items() if not k.startswith("_")}
    for name, classes in (("cond", CLASSES), ("uncond", None)):
        num_classes = len(classes) if classes else None
        unet = build_unet(cfg.model, resolution=8, channels=3, num_classes=num_classes)
        info = {"resolution": 8, "channels": 3, "num_classes": num_classes,
                "label_names": list(classes) if classes else None, "null_class": num_classes}
        save_single_file(root / f"{name}.safetensors", unet, scheduler, info)
    torch.jit.save(torch.jit.script(_TupleExtractor()), str(root / "features.pt"))
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(np.tile(np.array([0, 255], np.uint8), (8, 4))).save(root / "mask.png")
    (root / "file.txt").write_text("a file where a folder is expected\n")
    (root / "cwd").mkdir()
    return root


@pytest.fixture(autouse=True)
def _scratch_env(ws, monkeypatch):
    """No debug mode from the caller's shell; relative default outputs land in a scratch folder."""
    monkeypatch.delenv("DIFFTOOL_DEBUG", raising=False)
    monkeypatch.chdir(ws / "cwd")


class Hang(Exception):
    pass


@contextlib.contextmanager
def hang_guard():
    if not hasattr(signal, "SIGALRM"):  # Windows: no guard
        yield
        return

    def hung(signum, frame):
        raise Hang(f"no answer after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(ws: Path, argv: list[str], *fragments: str) -> None:
    """Run `difftool ARGV`; assert exit 2 with one `difftool: error:` line (holding `fragments`) and nothing else."""
    argv = [str(a).replace(WS, str(ws)) for a in argv]
    with hang_guard():
        result = runner.invoke(app, argv)
    shown = "difftool " + shlex.join(argv)
    if not isinstance(result.exception, SystemExit):
        detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"{shown}: {result.exception!r} escaped\n{detail}")
    assert result.exit_code == 2, f"{shown}: exit code {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, f"{shown}:\n{result.output}"
    assert result.stdout == "", f"{shown}: wrote to stdout:\n{result.stdout}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("difftool: error: "), f"{shown}: {lines}"
    for fragment in fragments:
        assert fragment in lines[0], f"{shown}: {fragment!r} not in {lines[0]!r}"


# ---------------------------------------------------------------- strategies: values


def _parses(kind, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


# Any text an argv can hold (no NUL, no lone surrogates).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16)
WORD = st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True)  # never read as an option
# click parses ints with int() and floats with float(): whatever those refuse is a usage error.
NOT_INT = st.one_of(st.sampled_from(["5-2", "a-b", "0-63", "1.5", "1e3", "0x10", "", " ", "ten", "nan"]),
                    TEXT).filter(lambda s: not _parses(int, s))
NOT_FLOAT = st.one_of(st.sampled_from(["1,5", "5-2", "", "one", "0x1p3"]), TEXT).filter(lambda s: not _parses(float, s))
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity"])


def unknown(known) -> st.SearchStrategy[str]:
    """A name that is none of `known` (compared without case, as the registries do)."""
    known = {k.lower() for k in known}
    return st.one_of(WORD, TEXT).filter(lambda s: s.lower() not in known)


def outside(lo: int | None, hi: int | None) -> st.SearchStrategy[int]:
    below = [st.integers(max_value=lo - 1)] if lo is not None else []
    above = [st.integers(min_value=hi + 1)] if hi is not None else []
    return st.one_of(*below, *above)


def options_of(command: str) -> set[str]:
    return {"--help"} | {opt for param in COMMANDS[command].params for opt in (*param.opts, *param.secondary_opts)}


# The positional arguments a command needs, as paths that do not exist (what follows them is the bad part).
MISSING = f"{WS}/missing/model"
REQUIRED = {
    "sample": ["sample", MISSING], "inspect": ["inspect", MISSING], "evaluate": ["evaluate", MISSING],
    "convert": ["convert", MISSING, f"{WS}/missing/target"], "train": ["train", "--dry-run"],
    "inpaint": ["inpaint", MISSING, MISSING, "--model", MISSING], "schedulers": ["schedulers"],
}
INT_OPTIONS = {
    "sample": ["--steps", "--num-images", "--batch-size", "--seed", "--num-processes", "--main-process-port"],
    "inpaint": ["--steps", "--jump-length", "--jump-n-sample", "--resample", "--num-samples", "--seed", "--batch-size",
                "--grow"],
    "evaluate": ["--num-samples", "--steps", "--batch-size", "--seed", "--feature-batch-size", "--kid-subset-size",
                 "--pr-k", "--reference-images", "--resolution", "--num-processes"],
    "convert": ["--resolution"],
    "train": ["--resolution", "--channels", "--max-steps", "--batch-size", "--seed", "--num-processes"],
}
FLOAT_OPTIONS = {"sample": ["--eta", "--guidance-scale"], "inpaint": ["--guidance-scale"], "evaluate": ["--guidance-scale"]}
# Options whose range the command line checks: (command, option, lowest valid, highest valid).
RANGED = [
    ("evaluate", "--feature-batch-size", 1, None), ("evaluate", "--kid-subset-size", 2, None),
    ("evaluate", "--pr-k", 1, None), ("evaluate", "--reference-images", 2, None), ("evaluate", "--resolution", 1, None),
    ("sample", "--num-processes", 1, None), ("evaluate", "--num-processes", 1, None),
    ("train", "--num-processes", 1, None),
    ("sample", "--seed", 0, SEED_MAX), ("inpaint", "--seed", 0, SEED_MAX), ("evaluate", "--seed", 0, SEED_MAX),
    ("sample", "--num-images", None, IMAGES_MAX), ("inpaint", "--num-samples", None, IMAGES_MAX),
    ("evaluate", "--num-samples", None, IMAGES_MAX),
]


@st.composite
def usage_errors(draw) -> tuple[list[str], str]:
    """(argv, what the error must name): malformed values, ranges, unknown options and commands, missing parts."""
    kind = draw(st.sampled_from(["int", "float", "range", "option", "no value", "command", "extra"]))
    if kind == "int":
        command = draw(st.sampled_from(sorted(INT_OPTIONS)))
        option = draw(st.sampled_from(INT_OPTIONS[command]))
        return REQUIRED[command] + [option, draw(NOT_INT)], option
    if kind == "float":
        command = draw(st.sampled_from(sorted(FLOAT_OPTIONS)))
        option = draw(st.sampled_from(FLOAT_OPTIONS[command]))
        return REQUIRED[command] + [option, draw(NOT_FLOAT)], option
    if kind == "range":
        command, option, lo, hi = draw(st.sampled_from(RANGED))
        return REQUIRED[command] + [option, str(draw(outside(lo, hi)))], option
    if kind == "option":
        command = draw(st.sampled_from(sorted(REQUIRED)))
        option = "--" + draw(WORD.filter(lambda w: "--" + w not in options_of(command)))
        return REQUIRED[command] + [option], option
    if kind == "no value":  # an option that takes a value, given last
        command = draw(st.sampled_from(sorted(INT_OPTIONS)))
        option = draw(st.sampled_from(INT_OPTIONS[command]))
        return REQUIRED[command] + [option], option
    if kind == "command":
        name = draw(WORD.filter(lambda w: w not in COMMANDS))
        return [name], name
    command = draw(st.sampled_from(["sample", "inspect", "convert", "schedulers"]))
    extra = draw(WORD)
    return REQUIRED[command] + [extra], extra


@given(case=usage_errors())
@settings(FUZZ, max_examples=60)
def test_usage_errors_are_one_line(ws, case):
    argv, named = case
    refused(ws, argv, named)


# ---------------------------------------------------------------- sampling options against a real model


@st.composite
def bad_sampling_options(draw, command: str) -> list[str]:
    """One option a tiny model (T = 50, classes circle/square/ring or none) cannot honour."""
    model = draw(st.sampled_from(["cond", "uncond"]))
    cases = {
        "steps": lambda: ["--steps", str(draw(outside(1, TIMESTEPS)))],
        "batch": lambda: ["--batch-size", str(draw(st.integers(max_value=0)))],
        "scheduler": lambda: ["--scheduler", draw(unknown(SCHEDULER_NAMES))],
        "weights": lambda: ["--weights", draw(unknown(["ema"]))],  # a single file holds its EMA weights only
        "dtype": lambda: ["--dtype", draw(unknown(["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])))],
        "guidance": lambda: ["--guidance-scale", draw(
            st.one_of(NON_FINITE, st.floats(max_value=-1e-6, allow_infinity=False).map(str)) if model == "cond"
            # an unconditional model takes no guidance other than 1
            else st.floats(allow_nan=True).filter(lambda g: g != 1.0).map(str))],
        "count": lambda: [{"sample": "--num-images", "evaluate": "--num-samples"}[command],
                          str(draw(st.integers(max_value=0)))],
        "both": lambda: ["--overwrite", "--resume"],
    }
    if command == "sample":
        cases.update({
            "format": lambda: ["--format", draw(unknown(["png", "npz"]))],
            "spacing": lambda: ["--timestep-spacing", draw(unknown(SPACINGS))],
            "eta": lambda: draw(st.one_of(
                st.tuples(st.just("--eta"), st.one_of(NON_FINITE, st.floats(max_value=-1e-6).map(str))),
                # eta is for ddim only (test_sample asks for that message)
                st.tuples(st.just("--scheduler"), st.sampled_from([s.name for s in SCHEDULERS if s.name != "ddim"]),
                          st.just("--eta"), st.floats(0, 1).map(str))).map(list)),
            "karras": lambda: ["--karras-sigmas", "--scheduler",
                               draw(st.sampled_from([s.name for s in SCHEDULERS if not supports_karras(s)]))],
            "class": lambda: ["--class", draw(
                st.one_of(unknown(CLASSES).filter(lambda c: not (c.isascii() and c.isdigit() and int(c) < 3)),
                          st.integers(min_value=3).map(str)) if model == "cond" else TEXT)],
            "output": lambda: ["-o", draw(st.sampled_from([f"{WS}/file.txt", f"{WS}/file.txt/below"]))],
        })
    name = draw(st.sampled_from(sorted(cases)))
    return [f"{WS}/{model}.safetensors", *cases[name]()]


@given(options=bad_sampling_options("sample"))
@settings(FUZZ, max_examples=50)
def test_sample_refuses_options_the_model_cannot_honour(ws, options):
    model, *rest = options
    refused(ws, ["sample", model, "-o", f"{WS}/cwd/samples", "-n", "2", "--steps", "2", "-q", *rest])


@given(options=bad_sampling_options("evaluate"))
@settings(FUZZ, max_examples=25)
def test_evaluate_refuses_sampling_options_before_any_work(ws, options):
    model, *rest = options
    refused(ws, ["evaluate", model, "--features", f"{WS}/features.pt", "-o", f"{WS}/cwd/evaluation", "-n", "2",
                 "--steps", "2", "-q", *rest])


# ---------------------------------------------------------------- inpaint options


@st.composite
def bad_inpaint_options(draw) -> list[str]:
    non_positive = st.integers(max_value=0).map(str)
    cases = [
        st.tuples(st.just("--method"), unknown(["repaint", "blend"])),
        st.tuples(st.just("--resample"), st.integers(max_value=-1).map(str)),
        st.tuples(st.sampled_from(["--num-samples", "--batch-size", "--jump-length", "--jump-n-sample"]), non_positive),
        st.tuples(st.just("--grow"), st.integers(max_value=-1).map(str)),
        st.tuples(st.just("--steps"), outside(1, TIMESTEPS).map(str)),
        # --scheduler, even a real one, is for --method blend only
        st.tuples(st.just("--scheduler"), st.sampled_from(sorted(SCHEDULER_NAMES))),
        st.tuples(st.just("--method"), st.just("blend"), st.just("--scheduler"), unknown(SCHEDULER_NAMES)),
        st.tuples(st.just("--method"), st.just("blend"), st.just("--resample"), st.integers(1, 3).map(str),
                  st.just("--scheduler"), st.sampled_from([s.name for s in SCHEDULERS if not s.resamples])),
        # without --class a class-conditional model fills in unconditionally: no guidance
        st.tuples(st.just("--guidance-scale"), st.floats(allow_nan=False).filter(lambda g: g != 1.0).map(str)),
        st.tuples(st.just("--class"), unknown(CLASSES).filter(lambda c: not (c.isascii() and c.isdigit() and int(c) < 3))),
        st.tuples(st.just("--weights"), unknown(["ema"])),
    ]
    return list(draw(st.one_of(cases)))


@given(options=bad_inpaint_options())
@settings(FUZZ, max_examples=25)
def test_inpaint_refuses_bad_options(ws, options):
    refused(ws, ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", f"{WS}/cond.safetensors",
                 "-o", f"{WS}/cwd/filled.png", "--steps", "2", "-q", *options])


# ---------------------------------------------------------------- files that are not what they claim to be


def _zip(members: dict[str, bytes]) -> bytes:
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        f.seek(0)
        return f.read()


def _safetensors_like(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                           max_leaves=6)
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


# A run config that cannot be read back: not text, not YAML, not a mapping, or a mapping of wrong things.
BROKEN_CONFIGS = st.one_of(
    st.binary(min_size=1, max_size=256).filter(lambda b: not _parses(lambda x: x.decode("utf-8"), b)),
    st.sampled_from([b"train: [unclosed", b"{a: 1", b"\t- tab", b"key: value: other", b"- just\n- a list\n", b"42"]),
    st.dictionaries(WORD.filter(lambda w: w not in {p.split(".")[0] for p in field_paths()}), JSON_VALUES,
                    min_size=1, max_size=3).map(lambda d: yaml.safe_dump(d).encode()),
    st.tuples(st.sampled_from(["train.batch_size", "train.max_steps", "data.resolution", "model.layers_per_block"]),
              st.one_of(TEXT, st.lists(st.integers(), max_size=2), st.floats(allow_nan=False).filter(
                  lambda f: not f.is_integer()))).map(
        lambda kv: yaml.safe_dump({kv[0].split(".")[0]: {kv[0].split(".")[1]: kv[1]}}).encode()),
)


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


def _recipe_file(ws_dir: str, data: bytes) -> str:
    path = Path(ws_dir) / "recipe.yaml"
    path.write_bytes(data)
    return str(path)


@st.composite
def bad_train_input(draw) -> tuple[list[str], bytes | None]:
    """(train options, bytes of a --recipe file or None); all with --recipe quickstart unless a file is given."""
    int_fields = ["train.batch_size", "train.max_steps", "data.resolution", "model.layers_per_block",
                  "model.norm_num_groups", "log.every", "checkpoint.every", "train.grad_accum"]
    kind = draw(st.sampled_from(["no =", "unknown key", "not an int", "not positive", "not finite", "not a bool",
                                 "flag", "recipe file", "recipe name", "resume"]))
    if kind == "no =":
        return ["--set", draw(TEXT.filter(lambda s: "=" not in s))], None
    if kind == "unknown key":
        key = draw(st.one_of(WORD, st.builds("{}.{}".format, WORD, WORD)).filter(lambda k: k not in field_paths()))
        return ["--set", f"{key}={draw(TEXT)}"], None
    if kind == "not an int":  # YAML that reads as text, a list or a fraction
        value = draw(st.one_of(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda s: s not in ("null", "true", "false")),
                               st.just("[1, 2]"), st.floats(0.1, 100).filter(lambda f: not f.is_integer()).map(str)))
        return ["--set", f"{draw(st.sampled_from(int_fields))}={value}"], None
    if kind == "not positive":  # counts and sizes
        return ["--set", f"{draw(st.sampled_from(int_fields))}={draw(st.integers(max_value=0))}"], None
    if kind == "not finite":  # rates and scales
        field = draw(st.sampled_from(["train.lr", "train.weight_decay", "model.dropout",
                                      "sample.guidance_scale", "ema.max_decay", "scheduler.beta_end"]))
        return ["--set", f"{field}={draw(st.sampled_from(['.nan', '.inf', '-.inf', 'nan', 'inf']))}"], None
    if kind == "not a bool":
        value = draw(st.one_of(st.integers().map(str), st.sampled_from(["maybe", "yes please", "[true]"])))
        return ["--set", f"model.class_conditional={value}"], None
    if kind == "flag":
        return draw(st.one_of(
            # quickstart has 3 UNet levels: the resolution must be a positive multiple of 4
            st.integers().filter(lambda n: n <= 0 or n % 4).map(lambda n: ["--resolution", str(n)]),
            st.integers().filter(lambda n: n not in (1, 3)).map(lambda n: ["--channels", str(n)]),
            st.integers(max_value=0).map(lambda n: ["--batch-size", str(n)]),
            st.integers(max_value=0).map(lambda n: ["--max-steps", str(n)]),
            unknown(["no", "fp16", "bf16", "auto"]).map(lambda m: ["--mixed-precision", m]),
        )), None
    if kind == "recipe file":
        return [], draw(BROKEN_CONFIGS)
    if kind == "recipe name":
        name = draw(WORD.filter(lambda w: w not in recipe_names()))
        return ["--recipe", name], None
    return ["--resume", f"{WS}/missing/run"], None


@given(case=bad_train_input())
@example(case=([], b"\x80"))  # a recipe file that is not UTF-8
@example(case=(["--set", "model.norm_num_groups=0"], None))  # a division by it follows the check
@example(case=(["--set", "train.lr=nan"], None))
@settings(FUZZ, max_examples=40)
def test_train_dry_run_refuses_bad_config(ws, case):
    options, recipe = case
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        if recipe is not None:
            options = ["--recipe", _recipe_file(tmp, recipe)]
        elif "--recipe" not in options and "--resume" not in options:
            options = ["--recipe", "quickstart", *options]
        refused(ws, ["train", *options, "--output", f"{tmp}/run", "--dry-run"])


# ---------------------------------------------------------------- evaluate


@st.composite
def bad_sweeps(draw) -> str:
    """A --sweep that names no scheduler, an unknown one, or a step count that is no whole number in 1..T."""
    good = st.sampled_from(sorted(SCHEDULER_NAMES))
    kind = draw(st.sampled_from(["no colon", "unknown", "bad steps", "too many steps", "empty"]))
    if kind == "no colon":
        part = draw(TEXT.filter(lambda s: ":" not in s and ";" not in s and s.strip()))
    elif kind == "unknown":
        name = draw(unknown(SCHEDULER_NAMES).filter(lambda s: s.strip() and s.strip().lower() not in SCHEDULER_NAMES
                                                     and ":" not in s and ";" not in s))
        part = f"{name}:{draw(st.integers(1, 9))}"
    elif kind == "bad steps":
        token = draw(st.one_of(TEXT.filter(lambda s: not (s.strip().isascii() and s.strip().isdigit())
                                           and "," not in s and ";" not in s),
                               st.sampled_from(["0", "00", "²", "1.5", "-3"])))
        part = f"{draw(good)}:{token}" if token.strip() else f"{draw(good)}:{token},"
    elif kind == "too many steps":
        part = f"{draw(good)}:{draw(st.integers(TIMESTEPS + 1, 10**6))}"
    else:
        return draw(st.sampled_from(["", ";", " ; ;"]))
    valid = [f"ddim:{n}" for n in draw(st.lists(st.integers(1, TIMESTEPS), max_size=2))]
    parts = valid + [part]
    return ";".join(draw(st.permutations(parts)))


@st.composite
def bad_evaluate_input(draw) -> list[str]:
    model, images, features = f"{WS}/cond.safetensors", f"{WS}/images.npz", f"{WS}/features.pt"
    out = ["-o", f"{WS}/cwd/evaluation", "-q"]
    return draw(st.sampled_from([
        lambda: ["evaluate", model, "--sweep", draw(bad_sweeps()), "--reference", images, "--features", features, *out],
        lambda: ["evaluate", images, "--features", draw(unknown(["inception", "dinov2"]).filter(
            lambda s: not s.startswith("dinov2:") and s.strip() not in (".", "..") and "/" not in s)), *out],
        lambda: ["evaluate", images, "--features", f"{WS}/missing/{draw(WORD)}.pt", *out],
        lambda: ["evaluate", images, "--features", features, "--inception-weights", features, *out],
        lambda: ["evaluate", images, "--features", features, "--scheduler", "ddim", *out],
        lambda: ["evaluate", images, "--features", features, "--sweep", "ddim:2", "--reference", images, *out],
        lambda: ["evaluate", model, "--features", features, "--sweep", "ddim:2", *out],
        lambda: ["evaluate", images, draw(TEXT.filter(lambda s: not s.startswith("-"))), "--features", features, *out],
        lambda: ["evaluate", images, "--reference", draw(st.sampled_from(["", " "])), "--features", features, *out],
        lambda: ["stats", "--features", features, *out],
        lambda: ["stats", images, "--features", features],
        lambda: ["stats", images, "--features", features, "-o",
                 draw(st.sampled_from([f"{WS}/file.txt", f"{WS}/cwd/stats.npy", f"{WS}/file.txt/stats.npz"]))],
        lambda: ["stats", draw(st.sampled_from(["", " "])), "--features", features, "-o", f"{WS}/cwd/s.npz"],
    ]))()


@given(argv=bad_evaluate_input())
@settings(FUZZ, max_examples=40)
def test_evaluate_refuses_bad_input(ws, argv):
    refused(ws, argv)


# ---------------------------------------------------------------- paths that do not exist, with odd names


ODD_NAME = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=24),
    st.text(" []{}()'\"`$%*?!&;|<>\\#~\n\t\r\u00e9\u2028\u200b\U0001f600", min_size=1, max_size=12),
).filter(lambda s: s not in (".", ".."))
TOO_LONG = st.integers(256, 400).map(lambda n: "x" * n)  # longer than a file name may be (255 bytes)


@st.composite
def odd_missing_paths(draw) -> list[str]:
    """A path that does not exist (below a folder that does not, or with a name too long to exist)."""
    name = draw(ODD_NAME)
    path = draw(st.sampled_from([f"{WS}/missing/{name}", f"{WS}/{draw(TOO_LONG)}", f"{WS}/file.txt/{name}"]))
    model, features = f"{WS}/cond.safetensors", f"{WS}/features.pt"
    return draw(st.sampled_from([
        ["sample", path], ["inspect", path], ["convert", path, f"{WS}/cwd/out"], ["evaluate", path],
        ["inpaint", path, f"{WS}/mask.png", "--model", model, "-o", f"{WS}/cwd/x.png"],
        ["inpaint", f"{WS}/image.png", path, "--model", model, "-o", f"{WS}/cwd/x.png"],
        ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", path, "-o", f"{WS}/cwd/x.png"],
        ["evaluate", f"{WS}/images.npz", "--features", path + ".pt", "-o", f"{WS}/cwd/ev"],
        ["evaluate", f"{WS}/images.npz", "--reference", path, "--features", features, "-o", f"{WS}/cwd/ev"],
        ["train", "--recipe", path + ".yaml", "--dry-run"],
        ["train", "--resume", path, "--dry-run"],
    ]))


@given(argv=odd_missing_paths())
@settings(FUZZ, max_examples=40)
def test_paths_that_do_not_exist(ws, argv):
    refused(ws, [*argv, "-q"] if argv[0] in ("sample", "evaluate", "inpaint") else argv)


# ---------------------------------------------------------------- the installed executable


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["sample", f"{WS}/missing/model", "--steps", "5-2"],
    ["inspect", f"{WS}/file.txt/model.safetensors"],
    ["sample", f"{WS}/missing/a\nb[x]"],
    ["sample", "no-such-owner/no-such-model"],  # a hub id; HF_HUB_OFFLINE=1 keeps the check local
    ["train", "--set", "train.batch_size", "--dry-run"],
])
def test_installed_executable_refuses_in_one_line(ws, argv):
    env = {k: v for k, v in os.environ.items() if k != "DIFFTOOL_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = difftool_cmd() + [a.replace(WS, str(ws)) for a in argv]
    proc = subprocess.run(cmd, cwd=ws / "cwd", env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("difftool: error: "), lines
