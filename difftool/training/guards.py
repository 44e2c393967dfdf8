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


class StopOnSignal:
    """Ctrl-C and SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self, trainer):  # the loop's trainer: reads and sets stop_requested
        self.trainer = trainer
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.trainer.stop_requested:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            self.trainer.stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
