"""The training sessions of a run (RUN/sessions.jsonl): when each `difftool train` into it started and ended, on what.

metrics.jsonl says how far a run got, not how long it took nor on which machine. Each `train` appends a
`start` line (time, step, the hardware, the versions) and, however it ends, an `end` line (time, step,
outcome); a run trained in one go has one session, and every --resume adds one. A session with no end
line is still training, or was killed. Runs written before this file existed simply have none.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from difftool.versions import made_by
from difftool.safeio import append_jsonl, read_jsonl

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"  # reached max_steps; Ctrl-C or a signal; error


@contextlib.contextmanager
def training_session(path: Path | None, *, step: int, **facts) -> Iterator[dict]:
    """Record the block as one session in `path` (None: this process records nothing, as in non-main ranks).

    `facts` (max_steps, resumed_from, hardware) go into the start line with the versions. The caller sets
    `step` and `outcome` in the dict it is given; a block left by an exception is recorded as failed, one left
    by KeyboardInterrupt (a second Ctrl-C, SIGTERM outside the loop) as stopped: nothing went wrong.
    """
    end = {"step": None, "outcome": FAILED}
    if path is None:
        yield end
        return
    append_jsonl(path, {"event": "start", "time": time.time(), "step": step, **facts, **made_by()})
    try:
        yield end
    except KeyboardInterrupt:
        end["outcome"] = STOPPED
        raise
    finally:
        with contextlib.suppress(OSError):  # a full disk must not hide the error that ended the session
            append_jsonl(path, {"event": "end", "time": time.time(), **end})


@dataclass
class Session:
    """One `difftool train` into the run, as its lines recorded it."""

    start: dict  # the start line: time, step, max_steps, resumed_from, hardware, versions
    end: dict | None  # the end line: time, step, outcome; None while training, or when it was killed

    @property
    def started(self) -> float:
        return float(self.start["time"])

    def seconds(self, until: float) -> float:
        """How long it ran; an open session counts up to `until` (now, or the last sign of life of a killed one)."""
        stop = float(self.end["time"]) if self.end else until
        return max(0.0, stop - self.started)


def read_sessions(path: Path) -> list[Session]:
    """The sessions in `path`, oldest first; lines that are damaged or do not fit are passed over."""
    sessions: list[Session] = []
    for record in read_jsonl(path)[0]:
        if not _plausible_time(record.get("time")):
            continue
        if record.get("event") == "start":
            sessions.append(Session(record, None))
        elif record.get("event") == "end" and sessions and sessions[-1].end is None:
            sessions[-1].end = record
    return sessions


def _plausible_time(value) -> bool:
    """A Unix time a clock could have written (1970 to 2200): damaged lines (1e300, NaN) are passed over."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 7.3e9
