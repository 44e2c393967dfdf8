"""Shared by the fuzz tests: the hypothesis settings every generated case runs under, and a guard against hangs."""

from __future__ import annotations

import contextlib
import signal

from hypothesis import HealthCheck, settings

HANG_SECONDS = 120  # a guard against hangs only: a refusal takes well under a second

# suppress function_scoped_fixture: the only function-scoped fixtures used (the working folder, the
# environment) are meant to stay as they are for all examples of a test.
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

class Hang(Exception):
    pass


@contextlib.contextmanager
def hang_guard():
    if not hasattr(signal, "SIGALRM"):  # Windows: no guard
        yield
        return

    def hung(signum, frame):
        raise Hang(f"no answer after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
