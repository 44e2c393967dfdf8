"""How many CPU threads a difftool job computes with: a fair share of the cores among the user's difftool jobs.

torch gives every process one OpenMP thread per core. Two such processes on the same cores spend their time
at barriers, waiting for threads that are not scheduled: on 2 cores a training beside a sampling kept 29% of
its speed, each (benchmarks/contention.py), and 2-3% with three processes. So every job that computes (train,
sample, evaluate, inpaint, stats) registers while it runs, as one file in a folder of this user's
(`$XDG_RUNTIME_DIR/difftool-jobs`, else `/tmp/difftool-jobs-UID`), holding an flock on it: the kernel drops the
lock when the process dies, however it dies, so a stale file is known by its lock. A job's share is the
cores (this process's CPU affinity and cgroup quota) divided by the live jobs, the earliest taking what does
not divide; each job looks again at most every REBALANCE_SECONDS, between model calls, and changes its
thread count when the share changed.

Fixed counts: DIFFTOOL_THREADS=N (that many, whatever else runs), and OMP_NUM_THREADS as a ceiling (also
what `accelerate launch` gives each of its processes). Programs other than difftool are not counted: a
load average lags by a minute (a job started right after another finished would see the cores as busy),
so DIFFTOOL_THREADS is the way to leave cores to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from difftool.errors import UserError
from difftool.progress import show_notes
from difftool.safeio import loads_json

REBALANCE_SECONDS = 0.5  # a look costs about 30 µs; oversubscribed, a second costs far more
ENV_THREADS = "DIFFTOOL_THREADS"


@dataclass(frozen=True)
class Job:
    """One live difftool job as its registration file says."""

    pid: int
    since: float  # time.time() at registration: the earliest jobs get the threads that do not divide
    fixed: int | None  # its thread count when DIFFTOOL_THREADS fixed it; None for a job that takes its share


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup CPU quota
    (docker --cpus)."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def fixed_threads() -> int | None:
    """DIFFTOOL_THREADS, if set: a whole number of threads this job uses whatever else runs."""
    text = os.environ.get(ENV_THREADS, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{ENV_THREADS}={text!r} is not a number of threads; give a whole number >= 1, or unset it")
    return int(text)


def ceiling() -> int | None:
    """OMP_NUM_THREADS as a ceiling on the share, when it holds a number (an empty or odd value is ignored)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None


def fair_share(cores: int, jobs: list[Job], me: Job) -> int:
    """Threads for `me` among the live `jobs` (me included): the cores that fixed jobs leave, divided among the
    others, the earliest taking one more each until the remainder is used up; at least 1."""
    if me.fixed is not None:
        return me.fixed
    left = cores - sum(job.fixed for job in jobs if job.fixed is not None and job.pid != me.pid)
    sharing = sorted((job for job in jobs if job.fixed is None), key=lambda job: (job.since, job.pid))
    if not any(job.pid == me.pid for job in sharing):
        sharing.append(me)
    base, extra = divmod(max(left, 1), len(sharing))
    rank = next(i for i, job in enumerate(sharing) if job.pid == me.pid)
    return max(1, base + (1 if rank < extra else 0))


def jobs_folder() -> Path:
    """This user's registration folder, made private; refused if it is a link or another user's."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "difftool-jobs" if runtime and Path(runtime).is_dir() else \
        Path(tempfile.gettempdir()) / f"difftool-jobs-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{folder} is not a folder of this user's")
    return folder


def live_jobs(folder: Path) -> list[Job]:
    """The jobs whose registration is still held; files of dead processes are removed on the way."""
    found = []
    for path in folder.glob("*.json"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live job
                with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
                    record = loads_json(os.pread(fd, 4096, 0))
                    fixed = record.get("fixed")
                    found.append(Job(int(record["pid"]), float(record["since"]),
                                     int(fixed) if isinstance(fixed, int) and fixed >= 1 else None))
                continue
            with contextlib.suppress(OSError):  # not held: its process is gone
                path.unlink()
        finally:
            os.close(fd)
    for path in folder.glob(".*.tmp"):  # a registration whose process died before it was renamed into place
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 60:
                path.unlink()
    return found


class Share:
    """This process's registration and the thread count it has set."""

    def __init__(self, folder: Path | None, me: Job, cores: int):
        self.folder, self.me, self.cores = folder, me, cores
        self.threads = 0
        self.others = 0  # live difftool jobs besides this one, at the last look
        self.checked = 0.0
        self.said = False  # whether the job has said how many threads it computes with

    def decide(self) -> int:
        jobs = live_jobs(self.folder) if self.folder is not None else [self.me]
        self.others = sum(1 for job in jobs if job.pid != self.me.pid)
        share = fair_share(self.cores, jobs, self.me)
        limit = ceiling()
        return min(share, limit) if limit is not None and self.me.fixed is None else share

    def apply(self) -> None:
        import torch

        self.checked = time.monotonic()
        threads = self.decide()
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def why(self) -> str | None:
        """Why this job computes with fewer threads than there are cores, for the first line a command prints."""
        if self.threads >= self.cores:
            return None
        if self.me.fixed is not None:
            reason = f"{ENV_THREADS}={self.me.fixed}"
        elif self.others:
            reason = f"{self.others} other difftool job{'s' if self.others > 1 else ''} running"
        elif ceiling() is not None and self.threads == ceiling():
            reason = f"OMP_NUM_THREADS={ceiling()}"
        else:
            return None
        return f"{self.threads} of {self.cores} cores: {reason}"


_current: Share | None = None
_registered: tuple[Path | None, Job] | None = None  # (its folder, None where it could not be made; this job)


@contextlib.contextmanager
def registration() -> Iterator[tuple[Path | None, Job]]:
    """This process registered as a job for the block, before anything is computed or torch imported.

    A command registers from its first moment, so that a running job makes room while this one imports torch
    and loads its model (on 2 cores that start-up, beside a training that kept both, cut the training to a
    fifth). Nested blocks share the outer registration.
    """
    global _registered
    if _registered is not None:
        yield _registered
        return
    me = Job(os.getpid(), time.time(), fixed_threads())
    folder, fd = _register(me)
    _registered = (folder, me)
    try:
        yield _registered
    finally:
        _registered = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(folder / _file_name(me))
            os.close(fd)


def registered_early(command):
    """A command that computes, registered from its first moment (`registration`); one that hands itself over
    to `accelerate launch` (`num_processes` > 1) leaves that to its processes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if kwargs.get("num_processes", 1) > 1:
            return command(*args, **kwargs)
        with registration():
            return command(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def cpu_share() -> Iterator[Share]:
    """Compute with this job's share of the cores for the block (registering it, if the command has not).

    Nested blocks (evaluate samples through the sampling job) share the outer one. Where the folder cannot be
    made (a read-only /tmp), the job takes its share as if it were alone.
    """
    global _current
    if _current is not None:
        yield _current
        return
    import torch

    before = torch.get_num_threads()
    with registration() as (folder, me):
        _current = Share(folder, me, usable_cores())
        try:
            _current.apply()
            yield _current
        finally:
            _current = None
            torch.set_num_threads(before)


def _file_name(me: Job) -> str:
    """PID-TIME.json: unique even where processes of other pid namespaces (containers) share the folder."""
    return f"{me.pid}-{int(me.since * 1e6)}.json"


def _register(me: Job) -> tuple[Path | None, int | None]:
    """The registration, written and locked under a temporary name, then renamed into place: a job looking
    meanwhile never finds it unlocked (and so never removes it as dead) or half written."""
    try:
        folder = jobs_folder()
        tmp = folder / f".{_file_name(me)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": me.pid, "since": me.since, "fixed": me.fixed}).encode())
        os.replace(tmp, folder / _file_name(me))
    except OSError:
        os.close(fd)
        return None, None
    return folder, fd


def rebalance() -> None:
    """Between model calls: look at the other jobs again (at most every REBALANCE_SECONDS) and take the share."""
    share = _current
    if share is not None and share.me.fixed is None and time.monotonic() - share.checked >= REBALANCE_SECONDS:
        share.apply()


def sharing_cores(function):
    """`function` run as one computing job (`cpu_share`): the outer entry points of sample, evaluate, stats,
    inpaint."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with cpu_share():
            return function(*args, **kwargs)

    return wrapper


def describe() -> str | None:
    """`1 of 2 cores: 1 other difftool job running`, when the current job uses fewer threads than cores, for a
    command's first line (`train`'s); said once, `announce` then says nothing."""
    if _current is None:
        return None
    _current.said = True
    return _current.why()


def announce() -> None:
    """Where a job's work begins (after its checks, so a refused command prints only its error): one note on
    rank 0 saying how many threads it computes with and why, when fewer than the cores; once per job."""
    share = _current
    if share is not None and not share.said:
        share.said = True
        why = share.why()
        if why and os.environ.get("RANK", "0") == "0":
            show_notes([f"computing with {why}"])
