"""The verdict: what a run's last evaluation with its judge says about the model, in one line a person acts on.

`train` prints it when it ends and `difftool report` puts it at the top of the page. The figures are read
against what the judge does on real images: its held-out accuracy (the best right-class share a perfect
model could show) and the floor of its FD (what a model that draws exactly the data would score).
"""

from __future__ import annotations

LEARNED_RATIO = 2.0  # FD_judge within twice its floor: samples as close to the data as the judge can tell
FAR_RATIO = 5.0  # more than five times: the model has not learned the data's look yet
RIGHT_CLASS_SHARE = 0.9  # right class within 90% of the judge's own accuracy on real images
BRIGHTNESS_LEVELS = 5.0  # a mean pixel further than this from the data's is visible
WORSE = 2.0  # the last FD_judge more than twice the run's best: it got worse, not noisier (noise is a few %)
# How a run ended, for the verdict's advice; training/until.py's stop reason for the plateau is the same LEVELLED
FINISHED, LEVELLED = "finished", "levelled"
COLLAPSE = 0.5  # the largest predicted class halfway from its share of balanced data (1/K) to all of the samples


def crowded(classes: int) -> float:
    """The largest class share that says the samples crowd into one class: with 256 samples of 10 balanced
    classes, a share of 0.2 is the judge sorting unlearned squiggles, not a collapse; 0.55 is one."""
    return 1 / classes + COLLAPSE * (1 - 1 / classes)


def verdict(record: dict, judge: dict, *, run: str, step: int, ended: str | None = FINISHED,
            best: dict | None = None, command: str = "train", teacher: tuple[str, dict] | None = None) -> str | None:
    """One line: the figures beside what real images score, then what they mean and what to do (None without an
    FD_judge and its floor, which every judged evaluation has). `ended`: how the run ended, FINISHED or
    LEVELLED (`train.until: plateau` ended it because the judge saw no more gain, so more steps at that rate are
    not the advice); None for one still training, or stopped, which goes on first and is told nothing to do.
    `best`: the run's best evaluation (step, eval/fd_judge), which checkpoints/best keeps: a model that got clearly
    worse after it is told to go back to it. `command`: what continues the run (train, or distill for a student).
    `teacher`: a student's teacher (its run folder, and its newest evaluation by the same judge): a shortcoming the
    teacher's samples have as well is the teacher's to mend, not the student's.

    `record` is an evaluation record of metrics.jsonl (eval/fd_judge, eval/fd_judge_floor, eval/right_class,
    eval/largest_class_share, eval/brightness_error); `judge` the run's judge.json.
    """
    fd, floor = record.get("eval/fd_judge"), record.get("eval/fd_judge_floor")
    if not fd or not floor:
        return None
    report = judge.get("report", {})
    accuracy, classes = report.get("accuracy"), report.get("classes") or []
    figures, problems = [], []
    right = record.get("eval/right_class")
    if right is not None and accuracy:
        figures.append(f"right class {right:.0%} (the judge puts {accuracy:.0%} of real images in theirs)")
        if right < RIGHT_CLASS_SHARE * accuracy:
            problems.append("the model has not learned the classes yet")
    ratio = fd / floor
    figures.append(f"FD_judge {ratio:.1f}× its floor")
    if ratio > FAR_RATIO and not problems:
        problems.append("the samples do not look like the data yet")
    share = record.get("eval/largest_class_share")
    if share is not None and report.get("kind") == "classes" and classes and share > crowded(len(classes)):
        figures.append(f"one class takes {share:.0%} of the samples")
        problems.append("the samples crowd into one class")
    error = record.get("eval/brightness_error")
    if error is not None:
        figures.append(f"brightness {error:+.1f} levels")
        if abs(error) > BRIGHTNESS_LEVELS:
            problems.append(f"the samples are {'brighter' if error > 0 else 'darker'} than the data")
    head = f"judge at step {step}: " + "; ".join(figures)
    if best is not None and best.get("step") != step and fd > WORSE * best.get("eval/fd_judge", fd):
        worse = (f"the model got worse after step {best['step']} (FD_judge {best['eval/fd_judge']:.3g} there, "
                 f"{fd / best['eval/fd_judge']:.0f}× lower than now)")
        if ended is None:
            return f"{head}: {worse}"
        return (f"{head}: {worse}: sample its state there, difftool sample {run}/checkpoints/best, or train again "
                f"with a lower train.lr")
    if problems and ended is None:
        return f"{head}: {'; '.join(problems)}"
    if problems and teacher is not None and _inherited(record, teacher[1], report):
        theirs = teacher[1]
        return (f"{head}: {'; '.join(problems)}, as its teacher's samples (right class "
                f"{_share(theirs.get('eval/right_class'))}, FD_judge {theirs['eval/fd_judge'] / floor:.1f}× the floor): "
                f"train the teacher further (difftool train --resume {teacher[0]}), then distill it again")
    if problems and ended == LEVELLED:
        return (f"{head}: {'; '.join(problems)}, and train.until: plateau saw no more gain, so more steps will not "
                f"help: try a wider model (model.block_out_channels) or more images")
    if problems:
        return (f"{head}: {'; '.join(problems)}: train longer with difftool {command} --resume {run} "
                f"--max-steps {2 * step}")
    if ratio > LEARNED_RATIO and ended == LEVELLED:
        return f"{head}: close to the data, as close as train.until: plateau found this model gets"
    if ratio > LEARNED_RATIO:
        return f"{head}: close to the data; more training may still bring it closer to the floor"
    return f"{head}: as close to the data as the judge can tell"


TEACHER_POINTS = 0.03  # a student within 3 points of its teacher's right class has the teacher's classes
TEACHER_FD = 1.25  # and within 1.25× of its FD_judge, the teacher's look (the distillation goals)


def _inherited(record: dict, teacher: dict, report: dict) -> bool:
    """Whether the student is as good as its teacher by the judge, and the teacher itself falls short."""
    fd, theirs = record.get("eval/fd_judge"), teacher.get("eval/fd_judge")
    if not fd or not theirs or fd > TEACHER_FD * theirs:
        return False
    right, their_right = record.get("eval/right_class"), teacher.get("eval/right_class")
    if right is not None and their_right is not None and right < their_right - TEACHER_POINTS:
        return False
    accuracy, floor = report.get("accuracy"), record.get("eval/fd_judge_floor")
    short_on_classes = their_right is not None and bool(accuracy) and their_right < RIGHT_CLASS_SHARE * accuracy
    return short_on_classes or (bool(floor) and theirs / floor > FAR_RATIO)


def _share(value) -> str:
    return "-" if value is None else f"{value:.0%}"
