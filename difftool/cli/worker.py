"""What each `accelerate launch` worker runs: one command alone, parsed and reported as the CLI does.

`difftool train|sample|evaluate --num-processes N` launch `python -m difftool.<command>`; those three
modules are thin entry points that call `run_single_command` here, so the library never imports `cli/`.
"""

from __future__ import annotations

import typer

from difftool.cli import evaluate, sample, train
from difftool.cli.app import _run

COMMANDS = {"train": train.train, "sample": sample.sample, "evaluate": evaluate.evaluate}


def run_single_command(name: str) -> None:
    """Entry for `python -m difftool.<name>` (what `accelerate launch -m` runs): that command alone."""
    single = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    single.command(name)(COMMANDS[name])
    _run(single)
