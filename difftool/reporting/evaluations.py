"""The evaluations and sweeps of one run, found where `difftool evaluate` leaves them.

`difftool evaluate RUN` writes evaluations/NAME/metrics.json and `--sweep` evaluations/NAME-sweep/results.json,
under the folder it was started in (NAME: the run's folder name; a checkpoint's is NAME-step-N). Each
records the model it scored as typed; a folder belongs to this run when that path, taken from where the
evaluation was made, is the run or lies inside it (its model/, a checkpoint). When that path no longer
exists (the run was moved), the name decides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from difftool.evaluation.files import METRICS_FILE, RESULTS_JSON
from difftool.rundir import source_name


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
    places = [Path("evaluations"), run.resolve().parent.parent / "evaluations"]
    return [p for i, p in enumerate(places) if p.resolve() not in {q.resolve() for q in places[:i]}]


def find_evaluations(run: Path, places: list[Path]) -> tuple[list[Evaluation], list[Sweep]]:
    """This run's evaluations and sweeps among the folders directly under `places`."""
    evaluations, sweeps = [], []
    for folder in sorted({f.resolve() for place in places if place.is_dir() for f in place.iterdir() if f.is_dir()}):
        metrics, results = _read_json(folder / METRICS_FILE), _read_json(folder / RESULTS_JSON)
        if results is not None and isinstance(results.get("rows"), list):
            model = _model_of(run, str(results.get("source", "")), folder)
            if model is not None:
                sweeps.append(Sweep(folder, model, results))
        elif metrics is not None and isinstance(metrics.get("sampling"), dict):
            model = _model_of(run, str(metrics["sampling"].get("model", "")), folder)
            if model is not None:
                evaluations.append(Evaluation(folder, model, metrics))
    return evaluations, sweeps


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _model_of(run: Path, source: str, folder: Path) -> str | None:
    """What of `run` the evaluation in `folder` scored (relative to the run), or None when it is not the run's.

    A relative `source` was typed where `evaluate` ran: the folder above evaluations/ for a default output,
    else perhaps here.
    """
    source = WEIGHTS_NOTE.sub("", source)
    if not source:
        return None
    typed = Path(source.split("@")[0]).expanduser()
    candidates = [typed] if typed.is_absolute() else [folder.parent.parent / typed, Path.cwd() / typed]
    existing = [c.resolve() for c in candidates if c.exists()]
    root = run.resolve()
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
