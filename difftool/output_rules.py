"""Where a command writes: the default name of what it makes, and the rules every output follows (never one
of the command's inputs or inside one, --overwrite or not; never --overwrite with --resume)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from difftool.errors import UserError
from difftool.rundir import is_checkpoint_name


def source_name(source: str | Path) -> str:
    """A short name for what is made from `source`, for default output folders (samples/NAME-..., evaluations/NAME).

    A run folder and its model/ are the run's name, a checkpoint is RUN-step-N, a samples file is the folder
    it is in, a folder called samples is PARENT-samples; anything else is its own name without suffix.
    """
    path = Path(str(source).split("@")[0])  # a hub id may carry @revision
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if path.name == "model":
        name = path.parent.name
    elif (is_checkpoint_name(path) or path.name == "best") and path.parent.name == "checkpoints":
        name = f"{path.parent.parent.name}-{path.name}"
    elif path.suffix and path.stem == "samples" and path.parent.name:
        name = path.parent.name
    elif path.name == "samples" and path.parent.name:
        name = f"{path.parent.name}-samples"
    else:
        name = path.stem if path.suffix else path.name
    return re.sub(r"[^\w.-]+", "_", name) or "model"


@dataclass(frozen=True)
class Existing:
    """What a command does with outputs made before: refuse to touch them (the default), replace them
    (--overwrite), or keep them and make only what is missing (--resume)."""

    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        # --overwrite replaces what --resume would keep: asked for together, neither can be what was meant.
        if self.overwrite and self.resume:
            raise UserError("--overwrite and --resume exclude each other: choose one")


UNTOUCHED = Existing()  # the default: outputs made before are refused, neither replaced nor reused


def result_paths(source: Path, output: Path | None, default_name: str, count: int) -> list[Path]:
    """Where the `count` results made from the one input file `source` go: `output` as a .png file, or a folder
    (SOURCE.png in it); by default `default_name` in the working folder. Several results are NAME-k.png."""
    if output is None:
        target = Path(default_name)
    elif output.suffix.lower() == ".png":
        target = output
    else:
        target = output / f"{source.stem}.png"
    return numbered(target, count)


def numbered(path: Path, count: int) -> list[Path]:
    """`path` for one result; PATH-0.png ... PATH-(count-1).png for several."""
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{k}.png") for k in range(count)]


def refuse_inputs_as_output(output: Path, inputs: Mapping[str, object], *, replaces: bool = False,
                            option: str = "--output") -> None:
    """Refuse an `output` that is one of the `inputs` (what the command reads, by description) or lies inside one.

    `--overwrite` does not change this: it replaces earlier outputs, never the inputs. With `replaces`
    (the output is replaced as a whole), an output folder that holds an input is refused too. Inputs that
    are not local paths (hub ids, data set names) cannot be written over and are passed by.
    """
    for what, source in inputs.items():
        overlap = _overlap(Path(output), Path(str(source)).expanduser(), replaces) if source else None
        if overlap is not None:
            relation = {"same": f"is {what} itself", "inside": f"is inside {what} {source}",
                        "holds": f"is a folder holding {what} {source}, and would replace it"}[overlap]
            raise UserError(f"{option} {output} {relation}; difftool never writes over or into what it reads, "
                            f"--overwrite or not: choose another {option}")


def _overlap(output: Path, source: Path, replaces: bool) -> str | None:
    """same, inside or holds (where that matters): how `output` meets the existing path `source`."""
    try:
        if not source.exists():
            return None
        real, out = source.resolve(), output.resolve()
        if out == real or (output.exists() and os.path.samefile(output, source)):  # hard links too
            return "same"
        if source.is_dir() and out.is_relative_to(real):
            return "inside"
        if replaces and real.is_relative_to(out):
            return "holds"
    except (OSError, RuntimeError):  # a name too long to exist, a link that loops: nothing there to overlap with
        return None
    return None
