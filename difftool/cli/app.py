"""The `difftool` command: one Typer app, one thin module per command."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from difftool import __version__
from difftool.cli import (
    convert, distill, evaluate, img2img, inpaint, interpolate, noise, recipes, report, sample, schedulers, stats, train,
)
from difftool.cli.errors import (
    DEBUG_HELP,
    OneLineUsageErrors,
    debug_enabled,
    report as report_error,
    set_debug,
)
from difftool.cli.launch import COMMAND_ARGS
from difftool.progress import show_notes


class _Commands(OneLineUsageErrors):
    """difftool's commands: each keeps its arguments as typed (`--num-processes` hands them to the workers
    unchanged), and 0.1.0's `difftool evaluate stats DATA` still reaches `difftool stats`."""

    def resolve_command(self, ctx, args):
        if args[:2] == ["evaluate", "stats"] and not Path("stats").exists():  # a folder called stats is evaluated
            show_notes(["`difftool evaluate stats` is `difftool stats` now; the old spelling will go in a later version"])
            args = ["stats", *args[2:]]
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[COMMAND_ARGS] = list(rest)
        return name, command, rest


app = typer.Typer(
    name="difftool", cls=_Commands,
    help="Train, sample, inpaint, convert and evaluate pixel-space diffusion models (diffusers).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
app.command("train")(train.train)
app.command("distill")(distill.distill)
app.command("sample")(sample.sample)
app.command("schedulers")(schedulers.schedulers)
app.command("img2img")(img2img.img2img)
app.command("interpolate")(interpolate.interpolate)
app.command("inpaint")(inpaint.inpaint)
app.command("noise")(noise.noise)
app.command("convert")(convert.convert)
app.command("inspect")(convert.inspect)
app.command("evaluate")(evaluate.evaluate)
app.command("stats")(stats.stats)
app.command("report")(report.report)
app.add_typer(recipes.app, name="recipes")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"difftool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    set_debug(debug)


def main() -> None:
    """Console-script entry point."""
    _run(app)


def _run(typer_app: typer.Typer) -> None:
    """Unexpected errors get one line and exit 1 unless debugging (user errors exit 2 earlier).

    SIGTERM (`kill`, `docker stop`, a batch scheduler's time limit) is handled like Ctrl-C:
    `train` saves a checkpoint, `sample` keeps its finished images, temporary files are removed.
    Once the command has ended, both are ignored: all that is left is the interpreter's shutdown (torch's
    exit hooks among it), which a Ctrl-C would only cut short with a traceback, under the command's exit code.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        typer_app()
    except Exception as err:
        if debug_enabled():
            raise
        report_error(f"internal error: {type(err).__name__}: {err} (run with --debug or DIFFTOOL_DEBUG=1 for the traceback)")
        sys.exit(1)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
