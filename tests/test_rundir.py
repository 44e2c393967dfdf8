"""Run-folder layout: atomic writes, checkpoint listing and rotation, --resume targets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from difftool.errors import UserError
from difftool.rundir import PROGRESS_FILE, RunDir, read_progress, resolve_resume
from difftool.safeio import TMP_PREFIX, atomic_dir, atomic_path, write_text


class Boom(Exception):
    pass


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


def make_checkpoint(run: RunDir, step: int, name: str | None = None) -> Path:
    path = run.checkpoints_dir / (name or f"step-{step:06d}")
    path.mkdir(parents=True)
    (path / PROGRESS_FILE).write_text(json.dumps({"step": step}))
    return path


def make_run(root: Path, *steps: int) -> RunDir:
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text("recipe: quickstart\n")  # is_run() only asks for the file
    for step in steps:
        make_checkpoint(run, step)
    return run


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(TMP_PREFIX)
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block is done
    assert target.read_text() == "new"
    assert temporaries(tmp_path) == []


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise Boom
    assert target.read_text() == "old"
    assert temporaries(tmp_path) == []


def test_atomic_path_creates_parent_folders_and_no_file_on_failure(tmp_path):
    target = tmp_path / "a" / "b" / "x.txt"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise Boom
    assert not target.exists() and target.parent.is_dir()
    write_text(target, "done")
    assert target.read_text() == "done"
    assert temporaries(target.parent) == []


def test_atomic_dir_replaces_the_whole_folder_on_success(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(TMP_PREFIX)
        (tmp / "new.bin").write_text("new")
        assert (target / "old.bin").read_text() == "old"
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]  # replaced, not merged
    assert temporaries(tmp_path) == []


def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("new")
        raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["old.bin"]
    assert (target / "old.bin").read_text() == "old"
    assert temporaries(tmp_path) == []


def test_atomic_dir_creates_a_new_folder_and_none_on_failure(tmp_path):
    with pytest.raises(Boom), atomic_dir(tmp_path / "a") as tmp:
        (tmp / "f").write_text("x")
        raise Boom
    assert not (tmp_path / "a").exists()
    with atomic_dir(tmp_path / "b") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "b" / "f").read_text() == "x"
    assert temporaries(tmp_path) == []


def test_atomic_dir_survives_leftovers_of_an_interrupted_write(tmp_path):
    # Regression: a `.tmp-old-NAME` left by a write killed while deleting the old copy made the
    # next replacement fail with "Directory not empty".
    target = tmp_path / "model"
    target.mkdir()
    (target / "v1").write_text("1")
    for leftover in (f"{TMP_PREFIX}old-model", f"{TMP_PREFIX}model"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "junk").write_text("junk")
    with atomic_dir(target) as tmp:
        assert list(tmp.iterdir()) == []  # a fresh folder, not the leftover's contents
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["v2"]
    assert temporaries(tmp_path) == []


def _killed_between_the_renames(target: Path) -> None:
    """The state a kill between atomic_dir's two renames leaves: the old copy set aside, the new one
    beside it, nothing under the name."""
    for name, text in ((f"{TMP_PREFIX}old-{target.name}", "old, complete"), (f"{TMP_PREFIX}{target.name}", "new")):
        (target.parent / name).mkdir(parents=True)
        (target.parent / name / "weights").write_text(text)


def test_atomic_dir_puts_back_the_copy_a_kill_between_its_renames_set_aside(tmp_path):
    target = tmp_path / "best"
    _killed_between_the_renames(target)
    with pytest.raises(Boom), atomic_dir(target):
        raise Boom  # the next replacement fails too: the old copy must still be there
    assert (target / "weights").read_text() == "old, complete"
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------- RunDir


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.checkpoint(7) == tmp_path / "r" / "checkpoints" / "step-000007"
    assert run.sample_grid(1500) == tmp_path / "r" / "samples" / "step-001500.png"
    assert not run.is_run()
    make_run(tmp_path / "r2")
    assert RunDir(tmp_path / "r2").is_run()


def test_checkpoints_are_complete_ones_in_step_order(tmp_path):
    run = make_run(tmp_path / "run", 10, 2, 100)
    make_checkpoint(run, 999_999)
    make_checkpoint(run, 1_000_000, "step-1000000")  # past the 6-digit padding: must sort by number
    make_checkpoint(run, 200, f"{TMP_PREFIX}step-000200")  # being written
    (run.checkpoints_dir / "step-000300").mkdir()  # no progress.json: incomplete
    (run.checkpoints_dir / "step-000400").write_text("a file, not a checkpoint")
    assert [p.name for p in run.checkpoints()] == [
        "step-000002", "step-000010", "step-000100", "step-999999", "step-1000000"]
    assert run.latest_checkpoint() == run.checkpoints_dir / "step-1000000"
    assert read_progress(run.latest_checkpoint()) == {"step": 1_000_000}


def test_no_checkpoints(tmp_path):
    run = make_run(tmp_path / "run")
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    run.checkpoints_dir.mkdir()
    assert run.checkpoints() == [] and run.latest_checkpoint() is None


def test_rotate_deletes_the_oldest_beyond_keep(tmp_path):
    run = make_run(tmp_path / "run", 1, 2, 3, 4)
    tmp = make_checkpoint(run, 5, f"{TMP_PREFIX}step-000005")
    deleted = run.rotate(2)
    assert [p.name for p in deleted] == ["step-000001", "step-000002"]
    assert [p.name for p in run.checkpoints()] == ["step-000003", "step-000004"]
    assert not (run.checkpoints_dir / "step-000001").exists()
    assert tmp.is_dir()  # rotation only ever touches complete checkpoints
    assert run.rotate(2) == [] and run.rotate(10) == []
    assert len(run.checkpoints()) == 2


def test_rotate_without_a_limit_keeps_everything(tmp_path):
    run = make_run(tmp_path / "run", 1, 2, 3)
    assert run.rotate(None) == []
    assert len(run.checkpoints()) == 3


def test_clean_temporaries_removes_only_leftovers(tmp_path):
    run = make_run(tmp_path / "run", 10)
    run.samples_dir.mkdir()
    keep = [run.config, run.checkpoint(10), run.samples_dir / "step-000010.png"]
    keep[-1].write_bytes(b"png")
    leftovers = [
        run.root / f"{TMP_PREFIX}123-config.yaml",
        run.checkpoints_dir / f"{TMP_PREFIX}step-000020",
        run.samples_dir / f"{TMP_PREFIX}456-step-000020.png",
        run.root / f"{TMP_PREFIX}model",
    ]
    for path in leftovers:
        if path.suffix:
            path.write_text("partial")
        else:
            path.mkdir()
            (path / "partial").write_text("x")
    run.clean_temporaries()
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in keep)
    assert run.checkpoints() == [run.checkpoint(10)]


def test_clean_temporaries_puts_back_a_folder_set_aside_by_an_interrupted_replacement(tmp_path):
    # Regression: a kill between the renames that replace checkpoints/best left it only as
    # `.tmp-old-best`, and the next start's cleanup deleted it with the partial new one.
    run = make_run(tmp_path / "run", 10)
    _killed_between_the_renames(run.checkpoints_dir / "best")
    run.clean_temporaries()
    assert (run.checkpoints_dir / "best" / "weights").read_text() == "old, complete"
    assert temporaries(run.checkpoints_dir) == []


def test_clean_temporaries_on_a_fresh_folder_is_harmless(tmp_path):
    RunDir(tmp_path / "missing").clean_temporaries()
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- resolve_resume


def test_resume_a_run_folder_takes_its_latest_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", 5, 15, 10)
    assert resolve_resume(str(run.root)) == (run.root, run.checkpoint(15))


def test_resume_a_checkpoint_folder_takes_that_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", 5, 10)
    root, checkpoint = resolve_resume(str(run.checkpoint(5)))
    assert root == run.root and checkpoint == run.checkpoint(5)


def test_resume_latest_picks_the_newest_written_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    a = make_run(runs / "a", 100, 200)  # more steps, but written earlier
    b = make_run(runs / "b", 3)
    make_run(runs / "c")  # a run without checkpoints is never "latest"
    (runs / "notes.txt").write_text("not a run")
    os.utime(a.checkpoint(200) / PROGRESS_FILE, (1_000_000, 1_000_000))
    os.utime(b.checkpoint(3) / PROGRESS_FILE, (2_000_000, 2_000_000))
    assert resolve_resume("latest", runs) == (b.root, b.checkpoint(3))
    os.utime(a.checkpoint(200) / PROGRESS_FILE, (3_000_000, 3_000_000))
    assert resolve_resume("latest", runs) == (a.root, a.checkpoint(200))


def test_resume_latest_defaults_to_runs_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "only", 4)
    root, checkpoint = resolve_resume("latest")
    assert root.resolve() == (tmp_path / "runs" / "only").resolve()
    assert checkpoint.name == "step-000004"


@pytest.mark.parametrize("make_runs_root", [False, True])
def test_resume_latest_without_any_checkpoint(tmp_path, make_runs_root):
    runs = tmp_path / "runs"
    if make_runs_root:
        make_run(runs / "fresh")
    with pytest.raises(UserError, match=r"--resume latest found no run with a checkpoint under .*runs/; name the run folder"):
        resolve_resume("latest", runs)


def test_resume_errors_say_what_to_give_instead(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_resume(str(tmp_path / "nope"))
    assert str(err.value) == (f"cannot resume: {tmp_path / 'nope'} does not exist; "
                              "give a run folder, one of its checkpoints, or 'latest'")

    (tmp_path / "photos").mkdir()
    with pytest.raises(UserError, match=r"is not a difftool run folder \(no config.yaml\)"):
        resolve_resume(str(tmp_path / "photos"))

    fresh = make_run(tmp_path / "fresh")
    make_checkpoint(fresh, 5, f"{TMP_PREFIX}step-000005")  # only an unfinished one
    with pytest.raises(UserError, match="has no complete checkpoint yet; start it again with --overwrite"):
        resolve_resume(str(fresh.root))


def test_resume_an_incomplete_checkpoint_folder_is_refused(tmp_path):
    run = make_run(tmp_path / "run", 5)
    (run.checkpoints_dir / "step-000010").mkdir()  # no progress.json
    with pytest.raises(UserError) as err:
        resolve_resume(str(run.checkpoints_dir / "step-000010"))
    assert str(err.value) == (f"cannot resume from {run.checkpoint(10)}: its progress.json is missing; the newest "
                              f"complete checkpoint is {run.checkpoint(5)}: difftool train --resume {run.checkpoint(5)}")


@pytest.mark.parametrize(("progress", "problem"), [
    (None, "its progress.json is missing"),
    ('{"step": ', "its progress.json is damaged (Expecting value: line 1 column 10 (char 9))"),
    ("[]", "its progress.json is damaged (it holds a JSON list, not an object)"),
])
def test_resuming_a_run_never_passes_over_a_damaged_newest_checkpoint(tmp_path, progress, problem):
    run = make_run(tmp_path / "run", 5, 10, 15)
    (run.checkpoint(15) / PROGRESS_FILE).unlink()
    if progress is not None:
        (run.checkpoint(15) / PROGRESS_FILE).write_text(progress)
    (run.checkpoint(10) / PROGRESS_FILE).write_text("{}")  # damaged too: not offered instead
    expected = (f"cannot resume from {run.checkpoint(15)}: {problem}; the newest complete checkpoint is "
                f"{run.checkpoint(5)}: difftool train --resume {run.checkpoint(5)}")
    for target in (str(run.root), str(run.checkpoint(15))):
        with pytest.raises(UserError) as err:
            resolve_resume(target)
        assert str(err.value) == expected
    assert resolve_resume(str(run.checkpoint(5))) == (run.root, run.checkpoint(5))


def test_a_damaged_only_checkpoint_says_to_start_again(tmp_path):
    run = make_run(tmp_path / "run", 5)
    (run.checkpoint(5) / PROGRESS_FILE).write_text("")
    with pytest.raises(UserError, match=r"step-000005: its progress.json is damaged \(.*\); the run has no other "
                                        r"complete checkpoint: start it again with --overwrite"):
        resolve_resume(str(run.root))
