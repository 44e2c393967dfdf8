"""Outputs: never over or into an input, one clear line when they cannot be created, one writer per folder.

The README's "Guarantees" section states what these tests check; keep the two in step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool import config as config_mod
from difftool import safeio
from difftool.cli.errors import _user_message
from difftool.errors import UserError
from difftool.runlock import run_lock
from tests.conftest import (
    _TupleExtractor,
    assert_user_error,
    difftool_cmd,
    invoke,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("scratch_cwd")
WS = "{ws}"  # replaced by the workspace folder


@pytest.fixture(scope="module")
def ws(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run (tests here try to write into it), images, masks, a feature extractor."""
    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(tiny_run, root / "run")
    rng = np.random.default_rng(0)
    for folder in ("", "imgs/", "masks/"):
        (root / folder).mkdir(exist_ok=True)
        for name in ("a", "b") if folder else ("img",):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{folder}{name}.png")
    for name in ("mask.png", "masks/a.png", "masks/b.png"):
        Image.fromarray(np.tile(np.array([0, 255], np.uint8), (8, 4))).save(root / name)
    np.savez(root / "images.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    torch.jit.save(torch.jit.script(_TupleExtractor()), str(root / "features.pt"))
    (root / "tiny.yaml").write_text(config_mod.dump_yaml(tiny_config("train.max_steps=2")))
    (root / "file.txt").write_text("a file where a folder is expected\n")
    return root


def run(ws: Path, argv: list[str]):
    return invoke(*(a.replace(WS, str(ws)) for a in argv))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


INPAINT = ["inpaint", f"{WS}/img.png", f"{WS}/mask.png", "--model", f"{WS}/run", "--method", "blend", "--steps", "2",
           "-q"]
INPAINT_FOLDERS = ["inpaint", f"{WS}/imgs", f"{WS}/masks", "--model", f"{WS}/run", "--method", "blend", "--steps", "2",
                   "-q"]
SAMPLE = ["sample", f"{WS}/run", "--steps", "2", "-n", "2", "-q"]
FEATURES = ["--features", f"{WS}/features.pt", "-q"]
SWEEP = ["evaluate", f"{WS}/run", "--sweep", "ddim:2", "-n", "2", "--reference", f"{WS}/images.npz", *FEATURES]

# ---------------------------------------------------------------- inputs are never outputs

OWN_INPUTS = {
    "inpaint over its mask": [*INPAINT, "-o", f"{WS}/mask.png", "--overwrite"],
    "inpaint over its image": [*INPAINT, "-o", f"{WS}/img.png", "--overwrite"],
    "inpaint over its image, in a folder": [*INPAINT, "-o", WS, "--overwrite"],
    "inpaint into its model": [*INPAINT, "-o", f"{WS}/run/filled.png"],
    "inpaint folders into the image folder": [*INPAINT_FOLDERS, "-o", f"{WS}/imgs", "--overwrite"],
    "inpaint folders into the mask folder": [*INPAINT_FOLDERS, "-o", f"{WS}/masks/filled"],
    "sample into its run": [*SAMPLE, "-o", f"{WS}/run"],
    "sample into its model": [*SAMPLE, "-o", f"{WS}/run/model/samples", "--overwrite"],
    "evaluate into its images": ["evaluate", f"{WS}/imgs", *FEATURES, "-o", f"{WS}/imgs/evaluation"],
    "evaluate into its reference": ["evaluate", f"{WS}/images.npz", "--reference", f"{WS}/imgs", *FEATURES,
                                    "-o", f"{WS}/imgs", "--overwrite"],
    "evaluate a model into it": ["evaluate", f"{WS}/run", "-n", "2", "--steps", "2", *FEATURES, "-o", f"{WS}/run/ev"],
    "evaluate --sweep into its model": [*SWEEP, "-o", f"{WS}/run/sweep"],
    "stats over its data": ["stats", f"{WS}/images.npz", *FEATURES, "-o", f"{WS}/images.npz",
                                     "--overwrite"],
    "convert into its source": ["convert", f"{WS}/run", f"{WS}/run/sub"],
    "convert over its source": ["convert", f"{WS}/run/model", f"{WS}/run/model", "--overwrite"],
    "convert over the folder holding its source": ["convert", f"{WS}/run/model/unet", f"{WS}/run/model", "--overwrite"],
    "train into its data": ["train", "--recipe", f"{WS}/tiny.yaml", "--dataset", f"{WS}/imgs", "-q",
                            "--output", f"{WS}/imgs/run"],
}


@pytest.mark.parametrize("case", OWN_INPUTS)
def test_no_command_writes_over_or_into_what_it_reads(ws, case):
    before = snapshot(ws)
    line = assert_user_error(run(ws, OWN_INPUTS[case]), "difftool never writes over or into what it reads")
    assert "--overwrite or not: choose another" in line
    assert snapshot(ws) == before


def test_a_hard_link_to_an_input_is_that_input(ws, tmp_path):
    os.link(ws / "mask.png", tmp_path / "link.png")
    assert_user_error(run(ws, [*INPAINT, "-o", str(tmp_path / "link.png"), "--overwrite"]), "is the mask itself")


# ---------------------------------------------------------------- outputs that cannot be created

UNCREATABLE = {
    "under a file (ENOTDIR)": f"{WS}/file.txt/out",
    "in /proc (ENOENT)": "/proc/difftool-out",
    "a name too long (ENAMETOOLONG)": f"{WS}/{'x' * 300}",
}
WRITERS = {
    "train": lambda out: ["train", "--recipe", f"{WS}/tiny.yaml", "-q", "--output", out],
    "sample": lambda out: [*SAMPLE, "-o", out],
    "inpaint": lambda out: [*INPAINT, "-o", f"{out}.png"],
    "inpaint into a folder": lambda out: [*INPAINT, "-o", out],
    "inpaint folders": lambda out: [*INPAINT_FOLDERS, "-o", out],
    "convert": lambda out: ["convert", f"{WS}/run", out],
    "convert to a file": lambda out: ["convert", f"{WS}/run", f"{out}.safetensors"],
    "evaluate": lambda out: ["evaluate", f"{WS}/images.npz", *FEATURES, "-o", out],
    "evaluate a model": lambda out: ["evaluate", f"{WS}/run", "-n", "2", "--steps", "2", *FEATURES, "-o", out],
    "evaluate --sweep": lambda out: [*SWEEP, "-o", out],
    "stats": lambda out: ["stats", f"{WS}/images.npz", *FEATURES, "-o", f"{out}.npz"],
    "recipes cp": lambda out: ["recipes", "cp", "quickstart", f"{out}.yaml"],
}


@pytest.mark.parametrize("where", UNCREATABLE)
@pytest.mark.parametrize("command", WRITERS)
def test_every_output_that_cannot_be_created_is_one_line(ws, command, where):
    if where.startswith("in /proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    out = UNCREATABLE[where]
    line = assert_user_error(run(ws, WRITERS[command](out)))
    assert "internal error" not in line
    assert Path(out.replace(WS, str(ws))).name[:40] in line or "file.txt is a file" in line, line


@pytest.mark.parametrize(("code", "says"), [
    (errno.ENAMETOOLONG, "cannot create {out}: File name too long; shorten it"),
    (errno.EIO, "cannot create {out}: Input/output error; choose another output path"),
    # A full disk, a read-only file system, permissions: reported as they always were, with where to resume.
    (errno.EROFS, "Read-only file system: {out}; free space or fix permissions"),
    (errno.EACCES, "Permission denied: {out}; free space or fix permissions"),
    (errno.ENOSPC, "No space left on device: {out}; free space or fix permissions"),
])
def test_whatever_the_os_says_creating_an_output_is_one_line(tmp_path, monkeypatch, code, says):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises((UserError, OSError)) as err:
        safeio.make_folder(tmp_path / "out")
    assert _user_message(err.value).startswith(says.format(out=tmp_path / "out"))


def test_a_file_made_where_the_output_folder_goes_is_a_user_error(tmp_path):
    """A file that appears after the checks (EEXIST from mkdir), or stands above the folder (ENOTDIR)."""
    (tmp_path / "taken").write_text("")
    for out, blocking in ((tmp_path / "taken", tmp_path / "taken"), (tmp_path / "taken" / "below", tmp_path / "taken")):
        with pytest.raises(UserError, match=f"cannot create {out}: {blocking} is a file, not a folder; choose another"):
            safeio.make_folder(out)


# ---------------------------------------------------------------- one writer per output folder

LOCKED = {
    "sample": [*SAMPLE, "--resume", "-o", "{out}"],
    "evaluate": ["evaluate", f"{WS}/images.npz", *FEATURES, "--resume", "-o", "{out}"],
    "inpaint": [*INPAINT_FOLDERS, "-o", "{out}"],
}


@pytest.mark.parametrize("command", LOCKED)
def test_a_second_writer_of_an_output_folder_is_refused_naming_the_first(ws, tmp_path, command):
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in LOCKED[command]]
    with run_lock(out, command):  # the first process, still running
        assert_user_error(run(ws, argv), f"{out} is in use by another difftool {command} (pid {os.getpid()} on ",
                          f"per {command}.lock); wait for it to finish or stop it, or choose another --output")
        assert [p.name for p in out.iterdir()] == [f"{command}.lock"], "the refused one wrote nothing"
    result = run(ws, argv)
    assert result.exit_code == 0, result.output
    assert not (out / f"{command}.lock").exists()


@pytest.mark.parametrize("command", LOCKED)
def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(ws, tmp_path, command):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{command}.lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "since": "yesterday"}))
    result = run(ws, [a.replace("{out}", str(out)) for a in LOCKED[command]])
    assert result.exit_code == 0, result.output
    assert f"taking over {out / f'{command}.lock'} from pid {dead.pid} on elsewhere, which is no longer running" \
        in " ".join(result.stderr.split())  # rich wraps long lines
    assert not (out / f"{command}.lock").exists()


@pytest.mark.slow
def test_two_samples_into_one_folder_at_once(ws, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(difftool_cmd() + ["sample", str(ws / "run"), "-n", "100000", "--steps", "50", "-q",
                                               "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "sample.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = invoke("sample", ws / "run", "-n", "2", "--steps", "50", "-q", "-o", out, "--resume")
        assert_user_error(second, f"{out} is in use by another difftool sample (pid {first.pid} on ")
        assert first.poll() is None, "the refused one must not disturb the running one"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130 and not (out / "sample.lock").exists()
