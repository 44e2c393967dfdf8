"""What a report says about a run besides its curves: recipe and overrides, versions, hardware, state, wall time.

Read from config.yaml, sessions.jsonl, the run's lock and the newest checkpoint. A run written before a
file existed (0.1.0 has no sessions.jsonl) gets "not recorded" for what that file would have said.

Every file is read through `difftool.safeio` (regular files only, never through a link, bounded): the run may
come from someone else. config.yaml is the one the report cannot do without; the others, when damaged, are
left out with a note.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from difftool.config import config_from_dict, read_config_yaml, to_dict
from difftool.errors import UserError, first_line
from difftool.recipebook import flatten, parse_yaml, recipe_dir, recipe_names
from difftool.rundir import PROGRESS_FILE, RunDir
from difftool.versions import describe_versions
from difftool.runlock import holder
from difftool.safeio import UnsafeFile, read_json
from difftool.sessions import FAILED, FINISHED, STOPPED, Session, read_sessions

NOT_RECORDED = "not recorded"
HARDWARE_KEYS = ("processes", "device", "device_name", "mixed_precision", "host")


@dataclass
class Override:
    key: str  # dotted: train.max_steps
    recipe: object  # the built-in recipe's value (None where the recipe lacks the key)
    run: object  # the run's


@dataclass
class RunFacts:
    root: Path
    config: dict  # config.yaml as written
    recipe: str
    overrides: list[Override] | None  # None: the recipe is not a built-in one, nothing to compare with
    versions: list[str]  # one line per distinct set of versions the run was trained with
    hardware: list[str]  # one line per distinct machine set-up, or [NOT_RECORDED]
    sessions: list[Session]
    state: str  # training now / finished / stopped, with what to do next
    training: dict | None  # the live `train` holding the run (pid, host, since), if any
    step: int | None  # the last step in metrics.jsonl
    max_steps: int | None
    wall_seconds: float | None  # summed over sessions; None when no session was recorded
    notes: list[str]  # files left out (a sessions.jsonl that is a folder or a link), each with why

    @property
    def command(self) -> str:
        return _command(self.config)

    @property
    def untimed_steps(self) -> int:
        """Steps trained before the first recorded session (a run of 0.1.0 resumed since): not in the wall time."""
        first = self.sessions[0].start.get("step") if self.sessions else 0
        return first if isinstance(first, int) else 0

    @property
    def name(self) -> str:
        return self.root.resolve().name


def read_facts(run: RunDir, last_step: int | None) -> RunFacts:
    """The facts of `run`; `last_step` is the newest step of its metrics (the history knows it)."""
    if not run.is_run() and not os.path.lexists(run.config):  # a FIFO or link there: _read_config names it
        raise UserError(f"{run.root} is not a difftool run folder (no {run.config.name}); give the folder "
                        f"`difftool train` wrote, e.g. runs/quickstart-shapes")
    config = _read_config(run)
    recipe = str(config.get("recipe", "custom"))
    notes = []
    try:
        sessions = read_sessions(run.sessions)
    except UnsafeFile as err:
        sessions = []
        notes.append(str(err))
    max_steps = _max_steps(config, sessions)
    training = holder(run.root)
    return RunFacts(root=run.root, config=config, recipe=recipe, overrides=_overrides(config, recipe),
                    versions=_versions(run, config, sessions), hardware=_hardware(sessions), sessions=sessions,
                    state=_state(run, training, sessions, last_step, max_steps, _command(config)), training=training,
                    step=last_step, max_steps=max_steps,
                    wall_seconds=_wall_seconds(run, sessions, training is not None), notes=notes)


def _max_steps(config: dict, sessions: list[Session]) -> int | None:
    """The newest session's goal (a resumed run may train longer); else the config's, unless it counts epochs."""
    recorded = sessions[-1].start.get("max_steps") if sessions else None
    if isinstance(recorded, int):
        return recorded
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    return train.get("max_steps") if isinstance(train.get("max_steps"), int) and not train.get("epochs") else None


def _read_config(run: RunDir) -> dict:
    """config.yaml, or one line naming it: a link, a FIFO, nesting deeper than a parser takes, an alias bomb."""
    try:
        config = read_config_yaml(run.config)
    except (OSError, ValueError, yaml.YAMLError, UnsafeFile) as err:
        raise UserError(f"cannot read {run.config}: {first_line(err)}; the report needs the run's config") from err
    if not isinstance(config, dict):
        raise UserError(f"{run.config} is not a YAML mapping of sections; the report needs the run's config")
    return config


def _overrides(config: dict, recipe: str) -> list[Override] | None:
    """Where the run's config differs from the built-in recipe it names (as this difftool ships it)."""
    if recipe not in recipe_names():
        return None
    try:
        built_in = to_dict(config_from_dict({**parse_yaml((recipe_dir() / f"{recipe}.yaml").read_text()),
                                             "recipe": recipe}))
    except (UserError, OSError, yaml.YAMLError):
        return None
    ours, theirs = flatten(config), flatten(built_in)
    skip = {"recipe", "difftool_version"}
    decided = {k for k, v in theirs.items() if v == "auto" and isinstance(ours.get(k), bool)}  # what "auto" became
    return [Override(k, theirs.get(k), ours.get(k)) for k in sorted(ours.keys() | theirs.keys())
            if k not in skip | decided and ours.get(k) != theirs.get(k) and k in ours]



def _versions(run: RunDir, config: dict, sessions: list[Session]) -> list[str]:
    """Each session records its versions; older runs only in their newest checkpoint, or in config.yaml."""
    found = [describe_versions(s.start) for s in sessions if s.start.get("difftool_version")]
    if not found:
        recorded = _newest_progress(run)
        if recorded.get("difftool_version"):
            found = [describe_versions(recorded)]
        elif config.get("difftool_version"):
            found = [f"difftool {config['difftool_version']} (the other libraries' versions: {NOT_RECORDED})"]
    return list(dict.fromkeys(found)) or [NOT_RECORDED]


def _newest_progress(run: RunDir) -> dict:
    for checkpoint in reversed(run.checkpoints()):
        with contextlib.suppress(OSError, ValueError, UnsafeFile):
            progress = read_json(checkpoint / PROGRESS_FILE)
            if isinstance(progress, dict):
                return progress
    return {}


def _hardware(sessions: list[Session]) -> list[str]:
    lines = []
    for session in sessions:
        s = session.start
        if not any(k in s for k in HARDWARE_KEYS):
            continue
        precision = s.get("mixed_precision")
        lines.append(f"{s.get('processes', '?')} process(es) on {s.get('device', '?')} ({s.get('device_name', '?')}), "
                     f"{'fp32' if precision in (None, 'no') else precision}, host {s.get('host', '?')}"
                     + (f", {s['cpu_count']} CPU cores" if s.get("cpu_count") else ""))
    return list(dict.fromkeys(lines)) or [NOT_RECORDED]


def _command(config: dict) -> str:
    """What continues the run: `distill` for a student (config.yaml names its teacher), else `train`."""
    distill = config.get("distill")
    return "distill" if isinstance(distill, dict) and distill.get("teacher") else "train"


def _state(run: RunDir, training: dict | None, sessions: list[Session], step: int | None,
           max_steps: int | None, command: str) -> str:
    """training now / finished / stopped (and how), with where it is and what to do next."""
    at = f"at step {step:,}{f' of {max_steps:,}' if max_steps else ''}" if step is not None else "before its first log"
    if training is not None:
        return (f"training now ({at}; pid {training.get('pid')} on {training.get('host', '?')} since "
                f"{training.get('since', '?')}): make the report again for the newest curves")
    last = sessions[-1] if sessions else None
    outcome = last.end.get("outcome") if last and last.end else None
    if outcome == FINISHED or (step is not None and max_steps and step >= max_steps):
        return f"finished at step {step:,}" if step is not None else "finished"
    why = {STOPPED: "stopped (Ctrl-C or a signal)", FAILED: "stopped by an error"}.get(
        outcome, "killed (its last session recorded no end)" if last else "stopped")
    resume = f"; continue with difftool {command} --resume {run.root}" if run.latest_checkpoint() else ""
    return f"{why} {at}{resume}"


def _wall_seconds(run: RunDir, sessions: list[Session], training: bool) -> float | None:
    """Seconds over all sessions. The open one counts up to now while it trains; one that was killed, up to
    its last sign of life (the newest write of metrics.jsonl)."""
    if not sessions:
        return None
    until = time.time() if training else sessions[-1].started
    if not training:
        with contextlib.suppress(OSError):
            until = max(until, run.metrics.stat().st_mtime)
    return sum(s.seconds(until) for s in sessions)
