"""The run's judge as the page shows it: RUN/eval/judge.json read as data, the verdict, and a line about the judge.

judge.json is written by training (training/judging.py, `JudgeFacts.to_json`), but the run folder may come from
someone else: the file is read bounded and never through a link or from a FIFO, and every figure the page uses
is checked. A file that is missing, damaged or not a regular file means no verdict, never a failed page.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftool.evaluation.verdict import FINISHED, LEVELLED, verdict
from difftool.reporting.history import EVAL_PREFIX, History, finite, plausible_step, read_history
from difftool.rundir import RunDir, run_of
from difftool.safeio import UnsafeFile, read_json

JUDGE_FILE = "judge.json"  # in RUN/eval, as training/judging.py (JUDGE_RECORD) writes it
KINDS = ("classes", "quarter turns")  # what a judge was trained to tell apart (evaluation/judge.py)
VERDICT_KEYS = ("fd_judge", "fd_judge_floor", "right_class", "largest_class_share", "brightness_error")


@dataclass
class Judge:
    """The figures of judge.json the page uses; None where the file lacks one or holds something else."""

    kind: str  # "classes" or "quarter turns"
    classes: list[str]
    accuracy: float | None  # on held-out real images: the best right-class share a model could show
    held_out: int | None
    floor: float | None  # FD_judge between real images and the reference
    floor_images: int | None

    def describe(self) -> str:
        """'Judge: a 5-class classifier of the run's data, 96% right on 1,200 held-out images; floor ...'."""
        what = (f"a {len(self.classes)}-class classifier of the run's data" if self.kind == "classes"
                else "a network that tells the quarter turns of the run's images apart (the data has no classes)")
        if self.accuracy is not None:
            what += f", {self.accuracy:.0%} right on " + (f"{self.held_out:,} held-out images" if self.held_out
                                                          else "held-out images")
            what += f" (chance {1 / len(self.classes):.0%})"
        if self.floor is not None:
            what += f"; floor of FD_judge {self.floor:.2g}" + (f" at {self.floor_images:,} images"
                                                               if self.floor_images else "")
        return f"Judge: {what}."

    def as_json(self) -> dict:
        """What `verdict` reads of judge.json."""
        return {"report": {"kind": self.kind, "classes": self.classes, "accuracy": self.accuracy}}


def read_judge(run: RunDir) -> tuple[Judge | None, str | None]:
    """The run's judge, and why judge.json was left out (None when it was read, or there is none)."""
    path = run.eval_dir / JUDGE_FILE
    try:
        record = read_json(path)
    except FileNotFoundError:
        return None, None
    except UnsafeFile as err:  # it names the file
        return None, str(err)
    except (OSError, ValueError) as err:
        return None, f"{path}: {err}"
    report = record.get("report") if isinstance(record, dict) else None
    classes = report.get("classes") if isinstance(report, dict) else None
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or report.get("kind") not in KINDS):
        return None, f"{path} is not a judge's record (no kind and classes)"
    return Judge(report["kind"], classes, _number(report.get("accuracy")), _count(report.get("held_out")),
                 _number(record.get("floor")), _count(record.get("floor_images"))), None


def verdict_line(history: History, judge: Judge, run: str, *, finished: bool, command: str = "train",
                 levelled: bool = False, teacher: str | None = None) -> str | None:
    """The verdict on the newest evaluation with an FD_judge and its floor (the verdict reads one against the
    other), or None when there is none. Figures that are not numbers are left out of the record it reads.
    `teacher`: a student's distill.teacher, whose own newest evaluation the verdict reads it against."""
    scored = _scored(history)
    if not scored:
        return None
    newest = max(scored, key=lambda r: r["step"])
    least = min(scored, key=lambda r: r[EVAL_PREFIX + "fd_judge"])
    best = {"step": least["step"], "eval/fd_judge": least[EVAL_PREFIX + "fd_judge"]}
    return verdict(_figures(newest), judge.as_json(), run=run, step=newest["step"], best=best, command=command,
                   ended=(LEVELLED if levelled else FINISHED) if finished else None,
                   teacher=teacher_evaluation(teacher))


def teacher_evaluation(teacher: str | None) -> tuple[str, dict] | None:
    """A student's teacher run folder and its newest judged evaluation (None for a teacher that is no difftool run
    folder, or was never judged). The name comes from the student's config.yaml, which may be anyone's: one that
    is no usable path is no teacher, never a failed page."""
    try:
        root = run_of(teacher) if teacher else None
    except (OSError, ValueError):  # too long for a path, or a NUL in it
        return None
    scored = _scored(read_history(RunDir(root))) if root is not None else []
    return (str(root), _figures(max(scored, key=lambda r: r["step"]))) if scored else None


def _scored(history: History) -> list[dict]:
    return [r for r in history.evaluations if plausible_step(r.get("step"))
            and finite(r.get(EVAL_PREFIX + "fd_judge")) and _positive(r.get(EVAL_PREFIX + "fd_judge_floor"))]


def _figures(record: dict) -> dict:
    return {EVAL_PREFIX + k: record[EVAL_PREFIX + k] for k in VERDICT_KEYS if finite(record.get(EVAL_PREFIX + k))}


def _positive(value) -> bool:
    return finite(value) and value > 0


def _number(value) -> float | None:
    return value if finite(value) else None


def _count(value) -> int | None:
    return value if plausible_step(value) else None
