"""The one exception type for problems the user fixes, and the OS errors that are such problems."""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import reprlib
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path

# Full disk or quota, read-only file system, permissions, a file size limit (ulimit -f): fixed outside difftool,
# not a bug in it.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class UserError(Exception):
    """Bad input from the user: printed as one line with its remedy, exit code 2."""


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def storage_problem(err: OSError) -> str:
    """`No space left on device: PATH`, naming the file when the OS says which."""
    problem = f"{err.strerror or err}: {err.filename}" if err.filename else str(err.strerror or err)
    if err.errno == errno.EFBIG:
        problem += " (beyond the file size limit of this process, `ulimit -f`)"
    return problem


_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxset = 3, 6, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40


def shown(value) -> str:
    """`repr(value)` cut short for an error message: a recipe's nested aliases (a 'billion laughs') expand to
    billions of items in a plain repr, and a 400-digit number is not worth quoting whole."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def first_line(err: BaseException, limit: int = 160) -> str:
    """An exception's first line (or its type), for quoting it inside a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


@contextlib.contextmanager
def os_errors_of_writers(path: Path) -> Iterator[None]:
    """Re-raise a failed write of `path` as the OSError it was, naming `path`, whatever library wrote it.

    safetensors reports a full disk as `SafetensorError(... (os error 28))`, and torch's zip writer
    as `RuntimeError(... unexpected pos ...)` without saying why; for the latter the file system is
    asked (full? read-only?) while the partial file still takes its space.
    """
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # a failed write() names no file
    except Exception as err:
        code = _os_error_code(err, Path(path))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _os_error_code(err: Exception, path: Path) -> int | None:
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found:
        return int(found.group(1))
    if isinstance(err, RuntimeError) and re.search(r"PytorchStreamWriter|inline_container", str(err)):
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        with contextlib.suppress(OSError):
            fs = os.statvfs(existing)
            if fs.f_flag & os.ST_RDONLY:
                return errno.EROFS
            if fs.f_bavail * fs.f_frsize < 16 * 2**20:
                return errno.ENOSPC
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG  # Python ignores SIGXFSZ, so the write failed, and torch does not say why
    return None


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """'; did you mean X?' for an error message, or '' when nothing is close."""
    match = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    # Among near ties, a transposition ('ddmi' -> 'ddim') beats a substitution ('ddpm').
    match = sorted(match, key=lambda c: sorted(c) != sorted(word))[:1]
    if not match and "." in word:
        leaf = word.rpartition(".")[2]
        match = [c for c in choices if c.rpartition(".")[2] == leaf][:1]
    return f"; did you mean '{match[0]}'?" if match else ""
