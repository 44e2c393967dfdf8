"""The loop's small helpers: a loss window, the non-finite step budget, and stopping on a signal."""

from __future__ import annotations

import contextlib
import signal
import time

import torch

from difftool.errors import UserError
from difftool.progress import say


class Window:
    """Loss summed on the device between two reports, so that steps need no host sync."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)  # a step index, -1: none
        self.reset()

    def add(self, loss: torch.Tensor | None, step: int) -> None:
        """Count a step; `loss` None means it was skipped (and is not averaged in)."""
        self.steps += 1
        if loss is None:
            return
        self.loss += loss
        self.kept += 1
        fresh = (self.first_nonfinite < 0) & ~torch.isfinite(loss)
        self.first_nonfinite = torch.where(fresh, step, self.first_nonfinite)

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.kept, self.start = 0, 0, time.perf_counter()

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class NonFiniteSteps:
    """`train.skip_nonfinite`: skip a step whose gradients are NaN/inf, but not more than `limit` in a row.

    The gradient norm is taken after DDP's all-reduce, so every process makes the same decision.
    Checking it needs one host sync per step, which is why this is opt-in.
    """

    def __init__(self, limit: int, announce: bool):
        self.limit, self.announce, self.streak, self.skipped = limit, announce, 0, 0

    def state(self) -> dict:
        return {"skipped_steps": self.skipped, "nonfinite_streak": self.streak} if self.limit else {}

    def restore(self, progress: dict) -> None:
        self.skipped, self.streak = progress.get("skipped_steps", 0), progress.get("nonfinite_streak", 0)

    def skip(self, step: int, grad_norm: torch.Tensor, loss: torch.Tensor, last_checkpoint: str) -> bool:
        if torch.isfinite(grad_norm):
            self.streak = 0
            return False
        self.streak += 1
        self.skipped += 1
        if self.streak > self.limit:
            raise UserError(
                f"steps {step + 2 - self.streak}-{step + 1} in a row had non-finite gradients (more than "
                f"train.skip_nonfinite={self.limit}): the run has diverged. Lower train.lr, use "
                f"train.mixed_precision=no or set train.grad_clip, and resume from the last good checkpoint: "
                f"{last_checkpoint}")
        if self.announce:
            say(f"[yellow]warning:[/] step {step + 1}: non-finite gradients (loss {loss.item():.4g}); "
                f"update skipped ({self.streak} in a row, at most {self.limit})", highlight=False)
        return True


class EvaluationStopped(KeyboardInterrupt):
    """The first Ctrl-C/SIGTERM during an evaluation: it is abandoned, and the run stops as after any step.

    A KeyboardInterrupt, so that no `except Exception` on the way (an image decoder's, a loader's) swallows it,
    and so that anything that cleans up after Ctrl-C (temporary files, locks) does so for this too.
    """


class StopOnSignal:
    """Ctrl-C and SIGTERM ask the loop to save a checkpoint and stop after the current step.

    A step takes seconds, an evaluation (sampling, scoring, saving checkpoints/best) can take an hour: inside
    `abandonable()` the first signal also raises EvaluationStopped, which ends the evaluation at once. A second
    signal raises KeyboardInterrupt anywhere: stop now, keeping the newest complete checkpoint.
    """

    def __init__(self, trainer):  # the loop's trainer: reads and sets stop_requested; its accelerator
        self.trainer = trainer
        self.previous = {}
        self.abandoning = False

    def __enter__(self):
        def handler(signum, frame):
            if self.trainer.stop_requested:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            self.trainer.stop_requested = True
            if self.abandoning:
                raise EvaluationStopped

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    @contextlib.contextmanager
    def abandonable(self):
        """A block the first signal cuts short with EvaluationStopped (also raised on entry when a stop is
        already asked for). Keep out of it what must not stop halfway, such as swapping the EMA weights back.

        One process only: under DDP a process that left an evaluation early would leave the others waiting in
        its collectives, so there the evaluation ends first, and a second Ctrl-C stops at once.
        """
        if self.trainer.state.accelerator.num_processes > 1 or not self.previous:
            yield
            return
        if self.trainer.stop_requested:
            raise EvaluationStopped
        self.abandoning = True
        try:
            yield
        finally:
            self.abandoning = False


class Slowdown:
    """Notices, once, a training whose speed has fallen far below its own earlier speed: something else took
    the machine (another program; difftool's own jobs share the cores, see difftool/threads.py)."""

    FACTOR = 4  # under a quarter of the best rate: far beyond noise, or a second difftool job (a half)
    MIN_STEPS = 3  # windows of fewer steps time too little to compare
    IN_A_ROW = 2  # one slow window is a blip (a job starting beside it before the cores are shared again)

    def __init__(self):
        self.best = 0.0
        self.slow = 0  # slow windows in a row
        self.said = False

    def observe(self, rate: float, steps: int) -> str | None:
        """The warning to print for a window of `steps` steps at `rate` img/s, or None."""
        if steps < self.MIN_STEPS or self.said:
            return None
        if self.best and rate * self.FACTOR < self.best:
            self.slow += 1
            if self.slow < self.IN_A_ROW:
                return None
            self.said = True
            return (f"training now runs at {rate:.3g} img/s, under a quarter of its earlier {self.best:.3g} img/s: "
                    f"another program is using the machine's cores or memory bandwidth (difftool's own jobs share the "
                    f"cores between them; DIFFTOOL_THREADS=N fixes this job's thread count)")
        self.slow = 0
        self.best = max(self.best, rate)
        return None
