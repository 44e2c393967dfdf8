"""One difftool process per output folder: `FOLDER/COMMAND.lock`, held with an OS file lock.

`train` holds `RUN/train.lock`; `sample`, `evaluate`, `inpaint` and `img2img` (folder outputs) hold
`sample.lock`, `evaluate.lock`, `inpaint.lock` and `img2img.lock` in the folder they write, so two of them never
make the same files twice or mix two settings in one folder.

The kernel releases an `flock` when its process dies, however it dies (kill -9, OOM killer,
power-off of a container), so a lock can never be left held by nobody. The file itself names
its owner (pid, host, start time) for the refusal message; one left behind by a dead process
is simply taken over, with a notice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from difftool.errors import UserError, is_storage_error, storage_problem
from difftool.progress import show_notes
from difftool.rundir import lock_name
from difftool.safeio import UnsafeFile, creating, loads_json, make_folder, open_regular, read_json

MAX_PID = 2**31 - 1  # a pid beyond it cannot be a process's: the lock file is damaged

T = TypeVar("T")


@contextlib.contextmanager
def run_lock(root: Path, command: str = "train") -> Iterator[Path]:
    """Hold `root/COMMAND.lock` for the block; refuse if another live process holds it.

    A folder created here for the lock alone is removed again if the block leaves it empty
    (a refused or failed start leaves nothing behind).
    """
    created = make_folder(root)
    path = root / lock_name(command)
    fd = _acquire(path, command)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds the file gone and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                root.rmdir()


@contextlib.contextmanager
def main_process_lock(state, root: Path, command: str) -> Iterator[None]:
    """`run_lock` held by the main process of `state` (an Accelerator or PartialState) for the block.

    One process of a multi-process run holds the lock for all of them; a refusal stops them all.
    """
    with contextlib.ExitStack() as stack:
        on_main_process(state, lambda: stack.enter_context(run_lock(root, command)))
        yield


def on_main_process(state, action: Callable[[], T]) -> T | None:
    """`action()` on the main process (None elsewhere); a UserError there is raised on every process.

    The other processes would otherwise wait forever at a barrier the main one never reaches.
    """
    error, result = None, None
    if state.is_main_process:
        try:
            result = action()
        except UserError as err:
            error = str(err)
        except OSError as err:
            if not is_storage_error(err):
                raise
            error = f"{storage_problem(err)}; free space or fix permissions, or choose another --output"
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [error]
        broadcast_object_list(message)
        error = message[0]
    if error is not None:
        raise UserError(error)
    return result


def holder(root: Path, command: str = "train") -> dict | None:
    """The live owner named in `root/COMMAND.lock` (pid, host, since), read without taking the lock.

    For readers that must not get in a writer's way (`difftool report` of a run still training). A lock
    file left by a killed process on this host names a pid that is gone: nobody holds the folder then.
    """
    try:
        owner = read_json(root / lock_name(command))
    except (OSError, ValueError, UnsafeFile):
        return None
    if not isinstance(owner, dict) or not _is_pid(owner.get("pid")):
        return None
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
    return owner


def _acquire(path: Path, command: str) -> int:
    """An open descriptor holding the lock on `path` (the file as it is on disk now)."""
    while True:
        with creating(path):
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path.parent} is in use by another difftool {command} ({_describe(path)}); wait for it "
                            f"to finish or stop it, or choose another --output") from None
        # The holder we waited on may have deleted the file just before unlocking: lock the new one.
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            continue
        previous = _owner(fd)
        if _is_pid(previous.get("pid")):
            host = previous.get("host", "?")
            show_notes([f"taking over {path} from pid {previous['pid']} on {host}, which is no longer running"])
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd


def _owner(fd: int) -> dict:
    """The owner recorded in the lock file ({} if none or unreadable: then nobody is named)."""
    try:
        owner = loads_json(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _is_pid(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PID


def _describe(path: Path) -> str:
    try:
        owner = read_json(path, 4096)
        if not _is_pid(owner["pid"]):
            raise ValueError("no pid")
        return f"pid {owner['pid']} on {str(owner['host'])[:100]} since {str(owner['since'])[:40]}, per {path.name}"
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return f"see {path}"
