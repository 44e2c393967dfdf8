"""Outputs: one clear line when they cannot be created.

The README's "Guarantees" section states what these tests check; keep the two in step.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool import config as config_mod
from difftool import rundir
from difftool.cli.errors import _user_message
from difftool.errors import UserError
from tests.conftest import (
    _TupleExtractor,
    assert_user_error,
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
    "evaluate stats": lambda out: ["evaluate", "stats", f"{WS}/images.npz", *FEATURES, "-o", f"{out}.npz"],
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
        rundir.make_folder(tmp_path / "out")
    assert _user_message(err.value).startswith(says.format(out=tmp_path / "out"))


def test_a_file_made_where_the_output_folder_goes_is_a_user_error(tmp_path):
    """A file that appears after the checks (EEXIST from mkdir), or stands above the folder (ENOTDIR)."""
    (tmp_path / "taken").write_text("")
    for out, blocking in ((tmp_path / "taken", tmp_path / "taken"), (tmp_path / "taken" / "below", tmp_path / "taken")):
        with pytest.raises(UserError, match=f"cannot create {out}: {blocking} is a file, not a folder; choose another"):
            rundir.make_folder(out)
