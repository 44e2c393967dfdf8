"""A run's history as metrics.jsonl holds it: training lines (loss, lr, img/s) and evaluation lines (eval/...).

Training writes one line per `log.every` steps; evaluation during training writes its own lines, with
`step`, `eval/<distance>` (the key `difftool evaluate` gives the feature network's Fréchet distance: fid,
fd_dinov2, fd), `eval/kid`, and optionally `eval/kid_std`, `eval/num_samples`, `eval/seconds` and
`eval/best_step`. The file may be growing while it is read, or end in half a line: that line is counted,
not fatal. So is a line that could not come from training (a step of 400 digits, '[' * 5000): the run folder
may come from someone else, and one bad line must not cost the page.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftool.rundir import RunDir
from difftool.safeio import UnsafeFile, read_jsonl

EVAL_PREFIX = "eval/"
EVAL_EXTRAS = ("kid", "kid_std", "num_samples", "seconds", "best_step")  # every other eval/ key is a distance
DISTANCE_NAMES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "fd": "FD"}
SMOOTH_SPAN = 20  # the smoothed curve averages over about 1/SMOOTH_SPAN of the points
MAX_STEP = 10**15  # beyond any run; a larger step is damage, and a chart's float axis would overflow on it
MAX_VALUE = 1e100  # a logged value beyond it is damage: near float's limit matplotlib's axes fail (LinAlgError)


@dataclass
class Series:
    """One quantity over steps: the records that have it as a finite number, in step order."""

    steps: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class History:
    training: list[dict]  # records with a loss, lr or img/s
    evaluations: list[dict]  # records with eval/ keys
    damaged_lines: int  # lines that were not a JSON object (half-written, or damaged), or had no usable step
    unreadable: str | None = None  # why metrics.jsonl was not read at all (a folder, a link, too large)

    def series(self, key: str, records: list[dict] | None = None) -> Series:
        points = sorted((r["step"], float(r[key])) for r in (self.training if records is None else records)
                        if finite(r.get(key)) and plausible_step(r.get("step")))
        return Series([s for s, _ in points], [v for _, v in points])

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.training if plausible_step(r.get("step"))]
        return max(steps) if steps else None


@dataclass
class EvalHistory:
    """FID (or another distance) and KID over steps, and the best step by the distance."""

    key: str  # the distance's key: fid, fd_dinov2, fd
    distance: Series
    kid: Series
    kid_std: Series
    best_step: int
    best_value: float
    last: dict  # the newest evaluation record (number of samples, seconds)

    @property
    def name(self) -> str:
        return DISTANCE_NAMES.get(self.key, self.key.upper())


def read_history(run: RunDir) -> History:
    """metrics.jsonl's records; one that is not a regular file (a folder, a link) is left out with the reason."""
    try:
        records, damaged = read_jsonl(run.metrics)
    except UnsafeFile as err:
        return History([], [], 0, str(err))
    training, evaluations = [], []
    for record in records:
        if "step" in record and not plausible_step(record["step"]):
            damaged += 1
            continue
        (evaluations if any(k.startswith(EVAL_PREFIX) for k in record) else training).append(record)
    return History(training, evaluations, damaged)


def eval_history(history: History) -> EvalHistory | None:
    """The evaluations during training, or None when the run has none (or none with a distance)."""
    keys = [k[len(EVAL_PREFIX):] for r in history.evaluations for k in r if k.startswith(EVAL_PREFIX)]
    distances = [k for k in dict.fromkeys(keys) if k not in EVAL_EXTRAS]
    if not distances:
        return None
    key = distances[0]
    distance = history.series(EVAL_PREFIX + key, history.evaluations)
    if not distance.steps:
        return None
    recorded = [r[EVAL_PREFIX + "best_step"] for r in history.evaluations
                if plausible_step(r.get(EVAL_PREFIX + "best_step"))]
    best = recorded[-1] if recorded and recorded[-1] in distance.steps else None
    if best is None:  # not recorded: the lowest distance, the earliest of ties
        best = distance.steps[min(range(len(distance)), key=lambda i: (distance.values[i], i))]
    last = max((r for r in history.evaluations if plausible_step(r.get("step"))), key=lambda r: r["step"])
    return EvalHistory(key, distance, history.series(EVAL_PREFIX + "kid", history.evaluations),
                       history.series(EVAL_PREFIX + "kid_std", history.evaluations), best,
                       distance.values[distance.steps.index(best)], last)


def smooth(values: list[float], span: float = SMOOTH_SPAN) -> list[float]:
    """Exponential moving average over about 1/`span` of the points, debiased at the start (as TensorBoard's).

    A curve of `span` points or fewer is returned as it is: there is nothing to smooth.
    """
    weight = max(0.0, 1.0 - span / len(values)) if values else 0.0
    smoothed, mean, norm = [], 0.0, 0.0
    for value in values:
        mean = weight * mean + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        smoothed.append(mean / norm)
    return smoothed


def plausible_step(value) -> bool:
    """A step training could have written: an int from 0 to MAX_STEP."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def finite(value) -> bool:
    """A number that can be drawn: finite and within MAX_VALUE (an int of 400 digits is not; float() overflows)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_VALUE
