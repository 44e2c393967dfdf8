"""The evaluations and sweeps of one run, found where `difftool evaluate` leaves them.

`difftool evaluate RUN` writes evaluations/NAME/metrics.json and `--sweep` evaluations/NAME-sweep/results.json,
under the folder it was started in (NAME: the run's folder name; a checkpoint's is NAME-step-N). Each
records the model it scored as typed; a folder belongs to this run when that path, taken from where the
evaluation was made, is the run or lies inside it (its model/, a checkpoint). When that path no longer
exists (the run was moved), the name decides.

These folders may hold files from anywhere (an archive unpacked beside the runs): each file is read only if it
is a regular file of bounded size and JSON a parser can take. A damaged one is left out with a note naming it,
so that one bad file does not break the report of every run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from difftool.errors import UserError, first_line
from difftool.evaluation.files import METRICS_FILE, RESULTS_JSON
from difftool.output_rules import source_name
from difftool.safeio import JSON_LIMIT, kind_of, read_json

# A model's source as its samples record it: the path as typed, then which weights ("runs/x/model (EMA weights)").
THE_RUN = "the run"
WEIGHTS_NOTE = re.compile(r" \((?:EMA|raw) weights\)$")


@dataclass
class Evaluation:
    folder: Path
    model: str  # what was scored: "the run", or a path in it ("model", "checkpoints/step-000300")
    record: dict  # metrics.json


@dataclass
class Sweep:
    folder: Path
    model: str
    results: dict  # results.json: source, reference, features, distance, rows


def default_places(run: Path) -> list[Path]:
    """Where evaluations of `run` are looked for: ./evaluations, and evaluations/ beside the folder of runs
    (runs/x -> evaluations/), where `difftool evaluate runs/x` run from the project's folder writes."""
    places = [Path("evaluations"), Path(os.path.realpath(run)).parent.parent / "evaluations"]
    return [p for i, p in enumerate(places) if os.path.realpath(p) not in {os.path.realpath(q) for q in places[:i]}]


@dataclass
class Found:
    evaluations: list[Evaluation]
    sweeps: list[Sweep]
    damaged: list[str]  # "PATH: why", for each evaluation file that could not be read


def find_evaluations(run: Path, places: list[Path]) -> Found:
    """This run's evaluations and sweeps among the folders directly under `places`."""
    evaluations, sweeps, damaged = [], [], []
    for folder in _folders(places, damaged):
        metrics, results = _read_json(folder / METRICS_FILE, damaged), _read_json(folder / RESULTS_JSON, damaged)
        if results is not None and isinstance(results.get("rows"), list):
            model = _model_of(run, str(results.get("source", "")), folder)
            if model is not None:
                sweeps.append(Sweep(folder, model, results))
        elif metrics is not None and isinstance(metrics.get("sampling"), dict):
            model = _model_of(run, str(metrics["sampling"].get("model", "")), folder)
            if model is not None:
                evaluations.append(Evaluation(folder, model, metrics))
    return Found(evaluations, sweeps, damaged)


def _folders(places: list[Path], damaged: list[str]) -> list[Path]:
    """The folders directly under `places`, each once (links to folders are followed: these are the user's)."""
    found = set()
    for place in places:
        try:
            found |= {Path(os.path.realpath(f)) for f in place.iterdir() if f.is_dir()} if place.is_dir() else set()
        except OSError as err:
            damaged.append(f"{place}: {err.strerror or type(err).__name__}")
    return sorted(found)


def _read_json(path: Path, damaged: list[str]) -> dict | None:
    """The JSON object in `path`; None when there is none (noted in `damaged` unless the file is missing)."""
    try:
        found = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UserError) as err:  # UserError: a link, a FIFO, a folder, too large
        damaged.append(f"{path}: {_why(path, err)}")
        return None
    if not isinstance(found, dict):
        damaged.append(f"{path}: not a JSON object")
        return None
    return found


def _why(path: Path, err: Exception) -> str:
    if isinstance(err, ValueError):
        return f"not JSON ({first_line(err)})"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return kind_of(path) or f"larger than {JSON_LIMIT >> 20} MiB"  # what read_json refuses


def _model_of(run: Path, source: str, folder: Path) -> str | None:
    """What of `run` the evaluation in `folder` scored (relative to the run), or None when it is not the run's.

    A relative `source` was typed where `evaluate` ran: the folder above evaluations/ for a default output,
    else perhaps here.
    """
    source = WEIGHTS_NOTE.sub("", source)
    if not source:
        return None
    try:
        typed = Path(source.split("@")[0]).expanduser()
        candidates = [typed] if typed.is_absolute() else [folder.parent.parent / typed, Path.cwd() / typed]
        existing = [Path(os.path.realpath(c)) for c in candidates if c.exists()]
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a name too long: not this run
        return None
    root = Path(os.path.realpath(run))
    if existing:
        inside = [c for c in existing if c.is_relative_to(root)]
        if not inside:
            return None
        return THE_RUN if inside[0] == root else str(inside[0].relative_to(root))
    name = source_name(run)
    if source_name(source) == name:
        return "model" if typed.name == "model" else THE_RUN
    if source_name(source).startswith(f"{name}-step-"):
        return f"checkpoints/{typed.name}"
    return None
