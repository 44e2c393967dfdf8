"""`difftool report`: a run folder -> difftool.reporting.page.make_report (one self-contained HTML page)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from difftool.cli.errors import user_errors
from difftool.progress import say, show_notes

EXAMPLES = """

Examples:

  difftool report runs/quickstart-shapes          # -> runs/quickstart-shapes/report.html; open it in a browser

  difftool report runs/cifar --output cifar.html --evaluations ~/evals   # evaluations made elsewhere
"""


@user_errors
def report(
    run: Annotated[Path, typer.Argument(help="The run folder (what difftool train wrote); it may still be training.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write. Default: RUN/report.html.")] = None,
    evaluations: Annotated[list[Path] | None, typer.Option("--evaluations", help="Folder of evaluations to search for this run's (repeatable). Default: ./evaluations and the evaluations/ beside the runs folder.")] = None,
    max_grids: Annotated[int, typer.Option(min=1, help="Show at most this many preview grids, evenly spaced over the run.")] = 24,
    overwrite: Annotated[bool, typer.Option(help="Replace an --output file outside the run that is not a difftool report (a report is always replaced; inside the run, nothing else is).")] = False,
) -> None:
    """One HTML page about a run: curves, FID/KID, preview grids, evaluations, recipe, versions, hardware."""
    from difftool.reporting.page import make_report

    made = make_report(run, output, places=evaluations, max_grids=max_grids, overwrite=overwrite)
    show_notes(made.notes)
    grids = (f"{made.grids_total} preview grids" if made.grids_shown == made.grids_total
             else f"{made.grids_shown} of {made.grids_total} preview grids")
    # one line: a long path stays whole, to be copied or clicked
    say(f"[green]done[/]: {escape(str(made.path))} ({grids}, {made.evaluations} evaluation(s) and sweep(s) "
        f"found); open it in a browser: {escape(made.path.resolve().as_uri())}")


report.__doc__ = (report.__doc__ or "") + EXAMPLES
