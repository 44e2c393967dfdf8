"""A run folder from elsewhere is data, never a weapon: links and special files where difftool writes,
garbage in the files it reads back, recipes and flags built to blow up, a file size limit.

Each case ends in one `difftool: error:` line (exit 2) naming the file, and the user's own files untouched.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from difftool.errors import shown
from difftool.safeio import UnsafeFile, append_text, read_bounded, read_json
from tests.conftest import assert_user_error, difftool_cmd, invoke

pytestmark = pytest.mark.usefixtures("scratch_cwd")

DEEP_JSON = "[" * 5000


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the finished tiny run (checkpoints at steps 3 and 6)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", symlinks=True))


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def link(path: Path, target: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target.resolve())


# ---------------------------------------------------------------- writing through links and into special files


def test_a_linked_train_lock_is_refused_and_its_target_kept(run, victim):
    link(run / "train.lock", victim)
    assert_user_error(invoke("train", "--resume", run, "--max-steps", 7), "train.lock is a symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_linked_sessions_file_is_never_appended_to(run, victim):
    link(run / "sessions.jsonl", victim)
    assert_user_error(invoke("train", "--resume", run, "--max-steps", 7), "sessions.jsonl is a symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_linked_metrics_file_is_never_read_nor_written(run, victim):
    link(run / "metrics.jsonl", victim)
    assert_user_error(invoke("train", "--resume", run, "--max-steps", 7), "metrics.jsonl is a symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_sample_lock_linked_to_the_model_config_leaves_the_model_whole(run, tmp_path):
    config = run / "model" / "unet" / "config.json"
    before = config.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample.lock").symlink_to(config.resolve())
    assert_user_error(invoke("sample", run, "-n", 1, "--steps", 2, "--output", out), "sample.lock is a symbolic link")
    assert config.read_bytes() == before


def special_file(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    return path


SPECIAL_KINDS = ["fifo", pytest.param("device", marks=pytest.mark.skipif(
    os.geteuid() != 0, reason="making a character device needs root"))]


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("command", ["convert", "report"])
def test_an_output_that_is_a_special_file_is_refused_overwrite_or_not(run, tmp_path, kind, command):
    target = special_file(tmp_path / "target", kind)
    args = ["convert", run, target] if command == "convert" else ["report", run, "--output", target]
    assert_user_error(invoke(*args, "--overwrite"), "is a", "not a file or folder")
    mode = os.lstat(target).st_mode
    assert (stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode))
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_linked_output_folder_is_replaced_as_a_link_never_followed(run, tmp_path):
    """`convert RUN link --overwrite`: the link gives way to the new folder; what it pointed to is kept."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (tmp_path / "converted").symlink_to(elsewhere)
    result = invoke("convert", run, tmp_path / "converted", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "converted").is_dir() and not (tmp_path / "converted").is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".tmp-*"))


def test_overwriting_a_run_with_its_own_weights_as_start_is_refused(run, tiny_recipe):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for source in (run, run / "model"):
        result = invoke("train", "--recipe", tiny_recipe, "--set", f"train.init_from={source}", "--output", run,
                        "--overwrite")
        assert_user_error(result, "train.init_from", "choose another --output")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# ---------------------------------------------------------------- garbage in the files read back


def test_deep_json_in_the_metrics_is_a_damaged_line_on_resume(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write(DEEP_JSON + "\n")
    result = invoke("train", "--resume", run, "--max-steps", 7)
    assert result.exit_code == 0, result.output
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert DEEP_JSON not in lines and json.loads(lines[-1])["step"] == 7


@pytest.mark.parametrize("content", [DEEP_JSON, "{\"step\": 1e999}", "[]", "\x00\xff"])
def test_a_garbage_progress_record_is_one_line_for_sample_and_resume(run, content):
    (run / "checkpoints" / "step-000006" / "progress.json").write_text(content)
    assert_user_error(invoke("train", "--resume", run, "--max-steps", 7), "progress.json")
    assert_user_error(invoke("sample", run / "checkpoints" / "step-000006", "-n", 1, "--steps", 2), "progress.json")


@pytest.mark.parametrize("content", [DEEP_JSON, '{"pid": 100000000000000000000, "host": "x", "since": "y"}', "\xff"])
def test_a_garbage_train_lock_is_taken_over(run, content):
    (run / "train.lock").write_text(content)
    result = invoke("train", "--resume", run, "--max-steps", 7)
    assert result.exit_code == 0, result.output


def test_a_billion_laughs_recipe_is_one_short_line(tmp_path):
    rows = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("\n".join(rows) + "\ntrain:\n  lr: *a9\n")
    line = assert_user_error(invoke("train", "--recipe", recipe, "--dry-run"), "not valid YAML", "aliases")
    assert len(line) < 1000


def test_a_billion_laughs_config_in_a_run_is_one_line_on_resume(run):
    rows = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (run / "config.yaml").write_text("\n".join(rows) + "\n")
    assert_user_error(invoke("train", "--resume", run, "--max-steps", 7), "config.yaml", "aliases")


def test_a_recipe_nested_too_deeply_is_one_line(tmp_path):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("train: " + DEEP_JSON)
    assert_user_error(invoke("train", "--recipe", recipe, "--dry-run"), "not valid YAML", "nested too deeply")


@pytest.mark.parametrize("how", ["--seed", "--set"])
def test_a_seed_too_large_for_torch_is_refused_before_anything_is_written(tiny_recipe, tmp_path, how):
    seed = "99999999999999999999999"
    args = ["--seed", seed] if how == "--seed" else ["--set", f"train.seed={seed}"]
    assert_user_error(invoke("train", "--recipe", tiny_recipe, *args, "--output", tmp_path / "x"), "seed")
    assert not (tmp_path / "x").exists()


def test_shown_values_are_short_whatever_they_hold():
    nested: list = ["lol"] * 9
    for _ in range(9):
        nested = [nested] * 9
    assert len(shown(nested)) <= 200
    assert len(shown(10**400)) <= 200


def test_a_file_size_limit_is_one_line_naming_it(tmp_path, tiny_recipe):
    def limit():  # 200 KiB: the config and a preview fit, a checkpoint does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    out = tmp_path / "run"
    result = subprocess.run([*difftool_cmd(), "train", "--recipe", str(tiny_recipe), "--output", str(out)],
                            capture_output=True, text=True, preexec_fn=limit, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("difftool: error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "ulimit -f" in errors[0], result.stderr


# ---------------------------------------------------------------- the file-safety module itself


def test_bounded_reads_refuse_links_fifos_folders_and_oversized_files(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "big").write_bytes(b"x" * 101)
    for name in ("link", "fifo", "folder", "big"):
        with pytest.raises(UnsafeFile, match=name):
            read_bounded(tmp_path / name, 100)
    (tmp_path / "deep.json").write_text(DEEP_JSON)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(tmp_path / "deep.json")


def test_a_read_confined_to_a_folder_refuses_a_linked_parent(tmp_path, victim):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples").symlink_to(victim.parent)
    with pytest.raises(UnsafeFile, match="outside"):
        read_bounded(tmp_path / "run" / "samples" / victim.name, 100, inside=tmp_path / "run")
    assert read_bounded(tmp_path / "run" / "samples" / victim.name, 100) == b"precious\n"


def test_appending_never_writes_through_a_link_or_into_a_fifo(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(UnsafeFile, match=name):
            append_text(tmp_path / name, "x\n")
    assert victim.read_text() == "precious\n"
    append_text(tmp_path / "new.jsonl", "{}\n")
    append_text(tmp_path / "new.jsonl", "{}\n")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n{}\n"


@pytest.mark.parametrize("command", ["sample", "train", "report"])
def test_an_output_that_is_a_link_loop_is_one_line(run, tmp_path, tiny_recipe, command):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {"sample": ["sample", run, "-n", 1, "--steps", 2, "-o", loop],
            "train": ["train", "--recipe", tiny_recipe, "--output", loop],
            "report": ["report", run, "--output", loop]}[command]
    assert_user_error(invoke(*argv), str(loop))
    assert loop.is_symlink()
