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

import shlex
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import strategies as st
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from difftool.cli.app import app
from difftool.config import field_paths
from difftool.models.build import build_noise_scheduler, build_unet
from difftool.models.export import save_single_file
from difftool.sampling.schedulers import SCHEDULERS
from tests.conftest import _TupleExtractor, tiny_config
from tests.fuzzing import hang_guard

runner = CliRunner()
WS = "{ws}"  # replaced by the workspace folder when a case runs

TIMESTEPS = 50  # scheduler.num_train_timesteps of the tiny models (conftest)
CLASSES = ("circle", "square", "ring")
COMMANDS = dict(get_command(app).commands)
SCHEDULER_NAMES = {name for spec in SCHEDULERS for name in (spec.name, *spec.aliases)}
CHECKPOINT_RECORD = {"step": 3, "resolution": 8, "channels": 3, "num_classes": None}  # a checkpoint's progress.json

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


# Any JSON value, nested a little.
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                           max_leaves=6)


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
