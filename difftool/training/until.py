"""How long a run trains: `train.until: steps` (the recipe's budget) or `plateau` (until the judge stops seeing gains).

With `plateau` the learning rate is held after its warm-up instead of following a schedule fixed in advance,
because the end is not known in advance. From the budget (`train.max_steps`) on, each evaluation asks whether
the judge's FD has improved, over the last PATIENCE evaluations, by more than its noise (the bootstrap spread
of the difference, pair by pair: every evaluation samples from the same seeds). When it has not, the curve
has levelled off: the learning rate then falls linearly to zero over a tenth of the steps trained so far, and
the run ends there. This is the warm-up, stable, decay
schedule of Hägele et al. (2024), which at a cooldown of 10-20% matches a cosine schedule of the same length;
here its length is decided by measurement. `train.until_max_steps` (default 4x the budget) bounds it: the
cooldown starts in time to end there if the curve never levels off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from difftool.config_rules import PLATEAU
from difftool.evaluation.verdict import LEVELLED

PATIENCE = 2  # evaluations without a gain larger than the noise: the curve has levelled off
COOLDOWN = 0.1  # of the steps trained when the decision is made
LIMIT_FACTOR = 4  # train.until_max_steps when it is null: this many times the budget
LIMIT = "limit"  # and LEVELLED, the verdict's name for a run the plateau ended


def cooldown_steps(start: int) -> int:
    return max(1, math.ceil(COOLDOWN * start))


@dataclass
class Budget:
    """`train.until: steps`: the run ends at its step budget; the recipe's lr_schedule applies."""

    max_steps: int

    def end(self) -> int:
        return self.max_steps

    def describe(self, start: int) -> str:
        return f"steps {start}->{self.max_steps}"

    def observe(self, step: int, score: float, noise: float, paired=None) -> dict | None:
        return None

    def state(self) -> dict:
        return {}

    def restore(self, progress: dict) -> None:
        """A fixed budget has no state of its own to restore (the step comes back with the checkpoint)."""


@dataclass
class Plateau:
    """`train.until: plateau`: train past `budget` while the judge's FD still improves, at most to `limit`."""

    budget: int
    limit: int
    warmup: int
    scores: list[list[float]] = field(default_factory=list)  # [step, FD, noise] of each evaluation
    decided: int | None = None  # the step where the cooldown began
    reason: str | None = None  # LEVELLED or LIMIT
    why: str = ""

    def forced_start(self) -> int:
        """The last step at which a cooldown can begin and still end by `limit`."""
        start = max(0, math.floor(self.limit / (1 + COOLDOWN)))
        while start + 1 + cooldown_steps(start + 1) <= self.limit:
            start += 1
        while start > 0 and start + cooldown_steps(start) > self.limit:
            start -= 1
        return start

    def cooldown_start(self) -> int:
        return self.decided if self.decided is not None else self.forced_start()

    def end(self) -> int:
        start = self.cooldown_start()
        return start + cooldown_steps(start)

    def lr_factor(self, step: int) -> float:
        """The learning rate at `step` as a fraction of train.lr: warm-up, hold, then the cooldown to zero."""
        if step < self.warmup:
            return step / self.warmup
        start = self.cooldown_start()
        if step < start:
            return 1.0
        return max(0.0, 1 - (step - start) / cooldown_steps(start))

    def describe(self, start: int) -> str:
        if self.limit == self.budget:  # nothing past the budget (as when there are no evaluations to follow)
            return f"steps {start}->{self.limit} (train.until: plateau at most {self.limit}: cooled down to the end)"
        if self.decided is not None or start >= self.forced_start():  # resumed inside the cooldown
            why = f"decided at step {self.decided}" if self.decided is not None else f"at most {self.limit}"
            return f"steps {start}->{self.end()} (train.until: plateau {why}: cooling down)"
        if start >= self.budget:  # resumed past the budget: on at the held rate until the rule decides
            return (f"from step {start} on while the judge's FD improves (train.until: plateau, past its budget of "
                    f"{self.budget}, at most {self.limit})")
        return (f"steps {start}->{self.budget}, then on while the judge's FD improves (train.until: plateau, "
                f"at most {self.limit})")

    def observe(self, step: int, score: float, noise: float, paired=None) -> dict | None:
        """Take the evaluation at `step`; the metrics.jsonl record of the decision when it decides to stop.

        `paired(a, b)` is the noise of the difference between the scores at steps a and b where it can be measured
        pair by pair (evaluations draw from the same seeds, so most of their noise is shared and cancels); without
        it the two scores' own noises are taken as independent, which overstates it."""
        if self.scores and step <= self.scores[-1][0]:
            return None  # the same step evaluated again (a resumed run): already counted
        self.scores.append([step, score, noise])
        if (self.decided is not None or step < self.budget or len(self.scores) <= PATIENCE
                or self.reason == LIMIT or step >= self.forced_start()):  # the limit's cooldown has begun: it ends it
            return self._limit_record(step)
        then = self.scores[-1 - PATIENCE]
        best = min(self.scores[-PATIENCE:], key=lambda s: s[1])
        measured = paired(int(then[0]), int(best[0])) if paired is not None else None
        gain = then[1] - best[1]
        noise_of_both = measured if measured is not None else math.hypot(then[2], best[2])
        if gain > noise_of_both:
            return self._limit_record(step)
        self.decided, self.reason = step, LEVELLED
        self.why = (f"FD_judge has not improved by more than its noise since step {int(then[0])} ({then[1]:.3g} then, "
                    f"{best[1]:.3g} at best since, noise {noise_of_both:.2g}); the learning rate cools down to zero "
                    f"by step {self.end()}")
        return self.record(step)

    def _limit_record(self, step: int) -> dict | None:
        """The decision record once the cooldown that `limit` forces has begun."""
        if self.decided is None and self.reason is None and step >= self.forced_start():
            self.reason = LIMIT
            self.why = (f"train.until_max_steps={self.limit} reached before FD_judge levelled off; the learning rate "
                        f"cools down to zero by step {self.end()}")
            return self.record(step)
        return None

    def record(self, step: int) -> dict:
        """The metrics.jsonl line of the decision, made at the evaluation of `step`."""
        return {"step": step, "until/decided": self.reason, "until/from": self.cooldown_start(),
                "until/end": self.end(), "until/why": self.why}

    def state(self) -> dict:
        return {"until": {"scores": self.scores, "decided": self.decided, "reason": self.reason, "why": self.why}}

    def restore(self, progress: dict) -> None:
        """The rule's state as a checkpoint saved it; a budget raised on resume past the decision reopens it."""
        saved = progress.get("until") or {}
        self.scores = [list(s) for s in saved.get("scores", [])]
        self.decided, self.reason, self.why = saved.get("decided"), saved.get("reason"), saved.get("why", "")
        reopened = self.budget > self.decided if self.decided is not None else (
            self.reason == LIMIT and bool(self.scores) and self.forced_start() > self.scores[-1][0])
        if reopened:
            self.decided, self.reason, self.why = None, None, ""


def until_of(cfg, max_steps: int):
    """The rule of `cfg.train.until` for a run whose step budget is `max_steps`."""
    if cfg.train.until == PLATEAU:
        return Plateau(max_steps, cfg.train.until_max_steps or LIMIT_FACTOR * max_steps, cfg.train.warmup_steps)
    return Budget(max_steps)
