"""The one exception type for problems the user fixes, and the OS errors that are such problems."""

from __future__ import annotations

import errno

# Full disk or quota, read-only file system, permissions: fixed outside difftool, not a bug in it.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class UserError(Exception):
    """Bad input from the user: printed as one line with its remedy, exit code 2."""


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


def storage_problem(err: OSError) -> str:
    """`No space left on device: PATH`, naming the file when the OS says which."""
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err.strerror or err)


def first_line(err: BaseException, limit: int = 160) -> str:
    """An exception's first line (or its type), for quoting it inside a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
