"""`difftool schedulers`: the samplers `--scheduler` accepts."""

from __future__ import annotations

import json
import textwrap
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from difftool.cli.errors import user_errors

stdout = Console()
# Below this many columns the eight-column table wraps its summaries into one word per line.
TABLE_WIDTH = 120


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
    if stdout.is_terminal and stdout.width >= TABLE_WIDTH:
        _print_table(rows)
    else:  # piped, or a narrow terminal: one short block per sampler, greppable by its name
        typer.echo("\n".join(_plain(row, width=min(stdout.width, 100)) for row in rows))


def _print_table(rows: list[dict]) -> None:
    table = Table(Column("name", no_wrap=True), "aliases", "diffusers class", "steps", "NFE", "stochastic", "karras",
                  "summary", caption="steps: recommended; NFE: model calls at those steps")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["aliases"]), row["class"], str(row["recommended_steps"]),
                      str(row["model_calls"]), _yes(row["stochastic"]), _yes(row["karras_sigmas"]), row["summary"])
    stdout.print(table)


def _plain(row: dict, width: int) -> str:
    aliases = f" (also {', '.join(row['aliases'])})" if row["aliases"] else ""
    facts = (f"{row['class']}; {row['recommended_steps']} steps = {row['model_calls']} model calls; "
             f"{'stochastic' if row['stochastic'] else 'deterministic'}; Karras sigmas: {_yes(row['karras_sigmas'])}")
    body = textwrap.wrap(f"{facts}. {row['summary']}", width=width - 2)
    return "\n".join([f"{row['name']}{aliases}", *("  " + line for line in body)])
