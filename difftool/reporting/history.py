"""A run's history as metrics.jsonl holds it: training lines (loss, lr, img/s), evaluation lines (eval/...) and
the decision of `train.until: plateau` (until/...).

Training writes one line per `log.every` steps; evaluation during training writes its own lines, with
`step`, `eval/<distance>` (the key `difftool evaluate` gives the feature network's Fréchet distance: fid,
fd_dinov2, fd, fd_judge), `eval/kid`, and optionally `eval/kid_std`, `eval/num_samples`, `eval/seconds`,
`eval/best_step`, the distance's noise and floor (`eval/fd_judge_std`, `eval/fd_judge_floor`) and the judge's
other figures (`eval/right_class`, `eval/largest_class_share`, `eval/brightness_error`). When `train.until:
plateau` decides to stop it writes one line with `until/decided`, `until/end` and `until/why`.

The file may be growing while it is read, or end in half a line: that line is counted, not fatal. So is a line
that could not come from training (a step of 400 digits, '[' * 5000): the run folder may come from someone
else, and one bad line must not cost the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from difftool.rundir import RunDir
from difftool.safeio import UnsafeFile, read_jsonl

EVAL_PREFIX = "eval/"
UNTIL_PREFIX = "until/"
# every other eval/ key is a distance, except a distance's companions: its noise (fd_judge_std), its floor
EVAL_EXTRAS = ("kid", "num_samples", "seconds", "best_step", "right_class", "largest_class_share", "brightness_error")
COMPANIONS = ("_std", "_floor")
DISTANCE_NAMES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "fd": "FD", "fd_judge": "FD_judge"}
SMOOTH_SPAN = 20  # the smoothed curve averages over about 1/SMOOTH_SPAN of the points
MAX_STEP = 10**15  # beyond any run; a larger step is damage, and a chart's float axis would overflow on it
MAX_VALUE = 1e100  # a logged value beyond it is damage: near float's limit matplotlib's axes fail (LinAlgError)


@dataclass
class Stop:
    """Where `train.until: plateau` decided to end the run: the learning rate cools down from `step` to `end`."""

    step: int
    decided: str  # "levelled" (FD_judge levelled off) or "limit" (train.until_max_steps reached)
    end: int
    why: str
    reached: bool  # training has logged step `end`: the run stopped there


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
    decisions: list[dict] = field(default_factory=list)  # records with until/ keys

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
    """FID (or another distance) and KID over steps, the best step by the distance, and what a judge adds."""

    key: str  # the distance's key: fid, fd_dinov2, fd, fd_judge
    distance: Series
    kid: Series
    kid_std: Series
    best_step: int
    best_value: float
    last: dict  # the newest evaluation record (number of samples, seconds)
    distance_std: Series  # the distance's noise (bootstrap spread), where recorded
    floor: Series  # the distance between two sets of real images, where recorded
    right_class: Series  # shares of samples from 0 to 1
    largest_class_share: Series
    brightness_error: Series  # the samples' mean pixel minus the data's, in levels of 255

    @property
    def name(self) -> str:
        return DISTANCE_NAMES.get(self.key, self.key.upper())


def read_history(run: RunDir) -> History:
    """metrics.jsonl's records; one that is not a regular file (a folder, a link) is left out with the reason."""
    try:
        records, damaged = read_jsonl(run.metrics)
    except UnsafeFile as err:
        return History([], [], 0, str(err))
    training, evaluations, decisions = [], [], []
    for record in records:
        if "step" in record and not plausible_step(record["step"]):
            damaged += 1
            continue
        if any(k.startswith(UNTIL_PREFIX) for k in record):
            decisions.append(record)
        else:
            (evaluations if any(k.startswith(EVAL_PREFIX) for k in record) else training).append(record)
    return History(training, evaluations, damaged, decisions=decisions)


def is_distance(key: str) -> bool:
    """Whether the eval/ key `key` (without the prefix) is a distance, not KID, a share or a distance's noise."""
    return key not in EVAL_EXTRAS and not key.endswith(COMPANIONS)


def eval_history(history: History) -> EvalHistory | None:
    """The evaluations during training, or None when the run has none (or none with a distance)."""
    keys = [k[len(EVAL_PREFIX):] for r in history.evaluations for k in r if k.startswith(EVAL_PREFIX)]
    distances = [k for k in dict.fromkeys(keys) if is_distance(k)]
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

    def series(name: str) -> Series:
        return history.series(EVAL_PREFIX + name, history.evaluations)

    return EvalHistory(key, distance, series("kid"), series("kid_std"), best,
                       distance.values[distance.steps.index(best)], last, series(key + "_std"),
                       series(key + "_floor"), series("right_class"), series("largest_class_share"),
                       series("brightness_error"))


def plateau_stop(history: History) -> Stop | None:
    """The newest decision of `train.until: plateau`, or None: there is none, or the run trained past its end
    (resumed with a larger budget, which reopens the decision)."""
    for record in reversed(history.decisions):
        step, end, decided = record.get("step"), record.get(UNTIL_PREFIX + "end"), record.get(UNTIL_PREFIX + "decided")
        if plausible_step(step) and plausible_step(end) and isinstance(decided, str):
            last = history.last_step
            if last is not None and last > end:
                return None
            why = record.get(UNTIL_PREFIX + "why")
            return Stop(step, decided, end, why if isinstance(why, str) else "", last is not None and last >= end)
    return None


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
