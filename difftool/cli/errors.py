"""User errors become one line and exit code 2; tracebacks only with --debug or DIFFTOOL_DEBUG=1."""

from __future__ import annotations

import contextlib
import errno
import functools
import os

import typer
from rich.markup import escape
from typer.core import TyperGroup, TyperOption

from difftool.errors import UserError, is_storage_error, storage_problem
from difftool.progress import say

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # the shell's code for a Ctrl-C (128 + SIGINT)
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
    say(f"[red]difftool: error:[/] {escape(_one_line(message))}", highlight=False, markup=True)


def _one_line(message: str) -> str:
    """Control characters (a newline in a quoted path) and undecodable bytes as escapes: one line, printable."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in message)


def user_errors(command):
    """Wrap a command so a UserError, a full disk, a read-only output or a path too long prints
    `difftool: error: ...` and exits 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, OSError) as err:
            message = _user_message(err)
            if debug_enabled() or message is None:
                raise
            report(message)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper


def _user_message(err: UserError | OSError) -> str | None:
    """The line for an error the user fixes; None for one that is a bug."""
    if isinstance(err, UserError):
        return str(err)
    if is_storage_error(err):
        return (f"{storage_problem(err)}; free space or fix permissions "
                f"(finished outputs are kept; --resume continues where there is one)")
    if err.errno == errno.ENAMETOOLONG:
        # Before Python 3.12 Path.exists() raises this rather than answering False: any path given can end here.
        return f"a path is too long for the file system; shorten it: {err.filename}"
    return None


DEBUG_HELP = "Show Python tracebacks (also DIFFTOOL_DEBUG=1)."


class OneLineUsageErrors(TyperGroup):
    """Click's usage errors (`--steps abc`, an unknown option, a missing argument) as one error line, exit 2.

    Typer prints them as the usage, a hint and a boxed panel: several lines, unlike every other error of
    the app. Root options are parsed in `make_context`, the subcommands' while the group invokes them.
    Every command also takes `--debug` after its name, where it is usually added to a failed command line.
    """

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and not any(param.name == "debug" for param in command.params):
            command.params.append(TyperOption(param_decls=["--debug"], is_flag=True, expose_value=False,
                                              callback=_turn_on_debug, help=DEBUG_HELP))
        return command


def _turn_on_debug(ctx, param, value: bool) -> None:
    if value:
        set_debug(True)


@contextlib.contextmanager
def _one_line_usage_errors():
    """Recognised by shape, not class: Typer exports no UsageError, and from 0.26 it bundles its own click."""
    try:
        yield
    except Exception as err:
        usage_error = getattr(err, "exit_code", None) == USER_ERROR_EXIT and hasattr(err, "format_message")
        if not usage_error or type(err).__name__ == "NoArgsIsHelpError":  # a bare `difftool`: the help is the answer
            raise
        ctx = getattr(err, "ctx", None)
        command = ctx.command_path if ctx is not None else "difftool"
        report(f"{' '.join(err.format_message().split())} (see {command} --help)")
        raise typer.Exit(USER_ERROR_EXIT) from None
