"""The run folder: one layout that training writes and every other command reads.

    RUN/
      config.yaml                 resolved config (recipe + overrides + difftool version)
      checkpoints/step-NNNNNN/    accelerate state (model, optimizer, LR scheduler, EMA, RNG)
                                  + unet_ema/ (diffusers folder) + progress.json
      model/                      diffusers pipeline: model_index.json, unet/ (EMA weights),
                                  unet_raw/ (raw weights), scheduler/, difftool.json
      samples/step-NNNNNN.png     sample grids (EMA weights, fixed seeds)
      metrics.jsonl               one JSON record per logged step (and per evaluation during training)
      sessions.jsonl              when each `difftool train` into the run started and ended, on what
      logs/                       tracker output (tensorboard, ...)
      train.lock                  while a `difftool train` runs: its pid (see runlock.py)

Everything is written through a temporary name and renamed into place (safeio.py), so a folder or file
that exists under its final name is complete; `output_rules.refuse_inputs_as_output` keeps each command
from writing over or into what it reads.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from difftool.errors import UserError, first_line
from difftool.safeio import (
    JSONL_LIMIT,
    TMP_PREFIX,
    UnsafeFile,
    kind_of,
    loads_json,
    read_bounded,
    read_json,
    remove_entry,
    remove_tree,
    restore_set_aside,
    write_text,
)

CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "progress.json"


def lock_name(command: str) -> str:
    """The lock file a running `difftool COMMAND` keeps in the folder it writes (see runlock.py)."""
    return f"{command}.lock"


LOCK_FILE = lock_name("train")


# ---------------------------------------------------------------- names

def new_run_folder(recipe: str, dataset: str) -> Path:
    """Where `difftool train` writes a run when no --output is given: runs/RECIPE-DATASET."""
    name = Path(dataset.rstrip("/\\")).name.replace("/", "-") or "data"
    return Path("runs") / f"{recipe}-{name}"


def run_of(source: str | Path) -> Path | None:
    """The run folder `source` is, or lies in (its model/, a checkpoint, a file in either), else None."""
    path = Path(source)
    return next((folder for folder in (path, path.parent, path.parent.parent) if RunDir(folder).is_run()), None)


class RunDir:
    """Paths of one run folder, and the few operations on it that need care."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    config = property(lambda self: self.root / CONFIG_FILE)
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    model_dir = property(lambda self: self.root / "model")
    samples_dir = property(lambda self: self.root / "samples")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    sessions = property(lambda self: self.root / "sessions.jsonl")
    logs_dir = property(lambda self: self.root / "logs")
    # The checkpoint with the best score of the evaluations during training; rotation never removes it.
    best_checkpoint = property(lambda self: self.checkpoints_dir / "best")
    eval_dir = property(lambda self: self.root / "eval")
    report = property(lambda self: self.root / "report.html")

    def is_run(self) -> bool:
        return self.config.is_file()

    def contents(self) -> list[Path]:
        """What the folder holds besides the lock of the process writing it."""
        return [p for p in self.root.iterdir() if p.name != LOCK_FILE] if self.root.is_dir() else []

    def clear(self) -> None:
        """Delete the run (for --overwrite), keeping the lock that guards the folder."""
        for p in self.contents():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:06d}"

    def sample_grid(self, step: int) -> Path:
        return self.samples_dir / f"step-{step:06d}.png"

    def trajectory_strip(self, step: int) -> Path:
        """What the first image of the grid at `step` went through (sample.trajectory)."""
        return self.samples_dir / f"step-{step:06d}-trajectory.png"

    def checkpoint_folders(self) -> list[Path]:
        """Every `step-NNNNNN` folder, oldest first, complete or not (temporary folders are never listed).

        Checkpoints are renamed to that name once complete, so one without its progress record is damaged.
        """
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted((p for p in self.checkpoints_dir.glob("step-*") if is_checkpoint_name(p)), key=checkpoint_step)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for p in self.checkpoint_folders() if (p / PROGRESS_FILE).is_file()]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def rotate(self, keep: int | None) -> list[Path]:
        """Delete the oldest checkpoints beyond `keep`; returns what was deleted."""
        found = self.checkpoints()
        doomed = found[: max(0, len(found) - keep)] if keep else []
        for path in doomed:
            remove_tree(path)
        return doomed

    def trim_metrics(self, step: int) -> None:
        """Keep the records up to `step`, where a resumed run continues: a killed run may have logged
        steps past its last checkpoint, or died in the middle of a line."""
        if not os.path.lexists(self.metrics):
            return
        kept = []
        for line in read_bounded(self.metrics, JSONL_LIMIT).decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
                if loads_json(line)["step"] <= step:
                    kept.append(line + "\n")
        write_text(self.metrics, "".join(kept))

    def clean_temporaries(self) -> None:
        """Remove what an interrupted write left behind (never a complete file or folder)."""
        for folder in (self.root, self.checkpoints_dir, self.samples_dir):
            if folder.is_dir():
                for old in folder.glob(f"{TMP_PREFIX}old-*"):
                    restore_set_aside(folder / old.name.removeprefix(f"{TMP_PREFIX}old-"))
                for p in folder.glob(f"{TMP_PREFIX}*"):
                    remove_entry(p)


def is_checkpoint_name(path: Path) -> bool:
    return re.fullmatch(r"step-\d+", path.name) is not None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def read_progress(checkpoint: Path) -> dict:
    """A checkpoint's progress record: at least its step."""
    progress = _parse_progress(checkpoint)
    if isinstance(progress, str):
        raise UserError(f"{checkpoint}/{progress}; use another checkpoint of the run")
    return progress


def progress_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's progress record (`progress.json is missing`, `... is damaged (...)`)."""
    progress = _parse_progress(checkpoint)
    return progress if isinstance(progress, str) else None


def _parse_progress(checkpoint: Path) -> dict | str:
    """The progress record, or what is wrong with it."""
    try:
        progress = read_json(checkpoint / PROGRESS_FILE)
    except FileNotFoundError:
        return f"{PROGRESS_FILE} is missing"
    except UnsafeFile:
        return f"{PROGRESS_FILE} is {kind_of(checkpoint / PROGRESS_FILE) or 'far too large'}, not a regular file"
    except (OSError, ValueError) as err:
        return f"{PROGRESS_FILE} is damaged ({first_line(err)})"
    if not isinstance(progress, dict):
        return f"{PROGRESS_FILE} is damaged (it holds a JSON {type(progress).__name__}, not an object)"
    if not isinstance(progress.get("step"), int):
        return f"{PROGRESS_FILE} is damaged (no step number in it)"
    return progress


def damaged_checkpoint(checkpoint: Path, problem: str) -> UserError:
    """The one refusal for a checkpoint that `--resume` cannot use, however it is damaged: what is wrong,
    the newest complete checkpoint of the run, and the command that resumes from it."""
    others = [c for c in RunDir(checkpoint.parent.parent).checkpoints()
              if c != checkpoint and progress_problem(c) is None]
    remedy = (f"the newest complete checkpoint is {others[-1]}: difftool train --resume {others[-1]}" if others else
              "the run has no other complete checkpoint: start it again with --overwrite")
    return UserError(f"cannot resume from {checkpoint}: {problem}; {remedy}")


def resolve_resume(target: str, runs_root: Path = Path("runs")) -> tuple[Path, Path]:
    """`--resume RUN|CHECKPOINT|latest` -> (run folder, checkpoint folder).

    `latest` is the run under `runs_root` whose newest checkpoint was written last.
    """
    if target == "latest":
        candidates = [RunDir(p) for p in runs_root.glob("*") if RunDir(p).is_run() and RunDir(p).latest_checkpoint()] if runs_root.is_dir() else []
        if not candidates:
            raise UserError(f"--resume latest found no run with a checkpoint under {runs_root}/; name the run folder instead")
        newest = max(candidates, key=lambda r: (r.latest_checkpoint() / PROGRESS_FILE).stat().st_mtime)
        return newest.root, resumable(newest.checkpoint_folders()[-1])
    path = Path(target).expanduser()
    if path.is_dir() and is_checkpoint_name(path) and RunDir(path.parent.parent).is_run():
        return path.parent.parent, resumable(path)
    run = RunDir(path)
    if not path.exists():
        raise UserError(f"cannot resume: {path} does not exist; give a run folder, one of its checkpoints, or 'latest'")
    if not run.is_run():
        raise UserError(f"cannot resume: {path} is not a difftool run folder (no {CONFIG_FILE})")
    if not run.checkpoint_folders():
        raise UserError(f"cannot resume: {path} has no complete checkpoint yet; start it again with --overwrite")
    return run.root, resumable(run.checkpoint_folders()[-1])


def resumable(checkpoint: Path) -> Path:
    """`checkpoint`, if its progress record is whole: a newer damaged one is never passed over in silence."""
    problem = progress_problem(checkpoint)
    if problem is not None:
        raise damaged_checkpoint(checkpoint, f"its {problem}")
    return checkpoint
