"""User errors become one line and exit code 2; tracebacks only with --debug or DIFFTOOL_DEBUG=1."""

from __future__ import annotations

import functools
import os

import typer
from rich.markup import escape

from difftool.errors import UserError
from difftool.progress import console

USER_ERROR_EXIT = 2
_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug or os.environ.get("DIFFTOOL_DEBUG", "") not in ("", "0")


def rank_zero() -> bool:
    """False in the non-main processes of `accelerate launch`, which leave the talking to rank 0."""
    return os.environ.get("RANK", "0") == "0"


def report(message: str) -> None:
    """Print the error once: under `accelerate launch`, only rank 0 speaks for all processes."""
    if not rank_zero():
        return
    # escape: a message quoting a path or key with [brackets] must print as written, not as markup
    console.print(f"[red]difftool: error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def user_errors(command):
    """Wrap a command so a UserError prints `difftool: error: ...` and exits 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            if debug_enabled():
                raise
            report(str(err))
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper
