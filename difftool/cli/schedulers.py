"""`difftool schedulers`: the samplers `--scheduler` accepts."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from difftool.cli.errors import user_errors

stdout = Console()


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@user_errors
def schedulers(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """Table of the samplers: diffusers class, steps, model calls, noise and Karras-sigma support.

    Model calls (NFE) are for the recommended steps; second-order samplers call the model twice a step.

    Examples:  difftool schedulers
               difftool schedulers --json
    """
    from difftool.sampling.schedulers import SCHEDULERS, describe  # diffusers: seconds to import, so not for --help

    rows = [describe(spec) for spec in SCHEDULERS]
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(Column("name", no_wrap=True), "aliases", "diffusers class", "steps", "NFE", "stochastic", "karras",
                  "summary", caption="steps: recommended; NFE: model calls at those steps")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["aliases"]), row["class"], str(row["recommended_steps"]),
                      str(row["model_calls"]), _yes(row["stochastic"]), _yes(row["karras_sigmas"]), row["summary"])
    stdout.print(table)
