"""Random bytes, deep JSON, links and special files thrown into a run folder: `train --resume`, `sample`,
`report` and `evaluate` finish or give one `difftool: error:` line (exit 2), never hang, never write
through a link, never an internal error.

Each example damages one file of a fresh copy of the tiny run. Runs derandomized (the same cases here and
in CI). A failure prints the argv and the damage; run it with `difftool --debug ...` for the traceback.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from difftool.cli.app import app
from tests.conftest import _TupleExtractor
from tests.fuzzing import FUZZ, hang_guard

runner = CliRunner()

def _victim_png() -> bytes:
    """A private picture of the user's, which a linked preview grid must not carry into a report."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


VICTIM = _victim_png()
# The files of a run that its readers open: records, locks, configs, weights' configs, a preview grid.
TARGETS = [
    "metrics.jsonl", "sessions.jsonl", "train.lock", "config.yaml", "checkpoints/step-000006/progress.json",
    "model/difftool.json", "model/unet/config.json", "model/scheduler/scheduler_config.json",
    "model/model_index.json", "samples/step-000006.png",
]
COMMANDS = ["resume", "sample", "report", "evaluate"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
# What lands in the target: (kind, payload).
DAMAGE = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("deep"), st.sampled_from(["[", "{\"a\":", "[{\"step\": "]).flatmap(
        lambda opener: st.integers(1000, 20000).map(lambda n: opener * n))),
    st.tuples(st.just("json"), JSON.map(repr)),
    st.tuples(st.just("append"), st.sampled_from(["[" * 5000, '{"step": 1' + "0" * 400 + "}", '{"time": 1e300}',
                                                  '{"step": 7, "eval/$\\\\foo$": 1}', "\x00\xff"])),
    st.tuples(st.sampled_from(["link", "link-dev-zero", "fifo", "folder", "link-dangling"]), st.just("")),
)


@pytest.fixture(scope="module")
def ws(tiny_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-run")
    torch.jit.save(torch.jit.script(_TupleExtractor()), str(root / "features.pt"))
    shutil.copytree(tiny_run, root / "run")
    (root / "cwd").mkdir()
    return root


@pytest.fixture(autouse=True)
def _scratch_env(ws, monkeypatch):
    monkeypatch.delenv("DIFFTOOL_DEBUG", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ws / "cwd")


def damage(path: Path, kind: str, payload: str, victim: Path) -> None:
    if kind == "append":
        with path.open("a", errors="surrogateescape") as f:
            f.write(payload + "\n")
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "bytes":
        path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    elif kind in ("deep", "json"):
        path.write_text(payload)
    elif kind == "link":
        path.symlink_to(victim)
    elif kind == "link-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "link-dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def argv_for(command: str, run: Path, out: Path, ws: Path) -> list[str]:
    return {
        "resume": ["train", "--resume", run, "--max-steps", "7", "-q"],
        "sample": ["sample", run, "-n", "1", "--steps", "2", "-o", out, "-q"],
        "report": ["report", run, "--output", out.with_suffix(".html")],
        "evaluate": ["evaluate", run, "-n", "2", "--steps", "2", "--features", ws / "features.pt",
                     "--reference", ws / "run" / "samples", "-o", out, "-q"],
    }[command]


@given(target=st.sampled_from(TARGETS), harm=DAMAGE, command=st.sampled_from(COMMANDS))
@example(target="train.lock", harm=("link", ""), command="resume")
@example(target="samples/step-000006.png", harm=("fifo", ""), command="report")
@example(target="samples/step-000006.png", harm=("link-dev-zero", ""), command="report")
@example(target="metrics.jsonl", harm=("append", "[" * 5000), command="report")
@example(target="checkpoints/step-000006/progress.json", harm=("deep", "[" * 5000), command="sample")
@settings(FUZZ, max_examples=60)
def test_a_damaged_run_folder_gives_one_line_or_works(ws, target, harm, command):
    kind, payload = harm
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        victim = Path(tmp) / "victim.png"
        victim.write_bytes(VICTIM)
        run = Path(shutil.copytree(ws / "run", Path(tmp) / "run", symlinks=True))
        damage(run / target, kind, payload, victim)
        argv = [str(a) for a in argv_for(command, run, Path(tmp) / "out", ws)]
        with hang_guard():
            result = runner.invoke(app, argv)
        shown = f"difftool {' '.join(argv)} with {target} made {kind} {payload[:40]!r}"
        if not isinstance(result.exception, (SystemExit, type(None))):
            detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            pytest.fail(f"{shown}: {result.exception!r} escaped\n{detail}")
        assert result.exit_code in (0, 2), f"{shown}: exit code {result.exit_code}\n{result.output}"
        assert "Traceback" not in result.output, f"{shown}:\n{result.output}"
        if result.exit_code == 2:
            lines = [ln for ln in result.stderr.splitlines() if ln.startswith("difftool: error:")]
            assert len(lines) == 1 and len(lines[0]) < 2000, f"{shown}: {result.stderr}"
        assert victim.read_bytes() == VICTIM, f"{shown}: wrote through a link"
        if command == "report" and result.exit_code == 0:
            page = Path(tmp, "out.html").read_text(errors="replace")
            assert base64.b64encode(VICTIM).decode() not in page, f"{shown}: read through a link"
