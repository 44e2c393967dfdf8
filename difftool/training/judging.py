"""The judge of a run (`eval.features: judge`): trained on the run's data before the first step, or reused.

RUN/eval/judge.pt is the network (TorchScript, evaluation/judge.py) and RUN/eval/judge.json what is known about
it: the data it learned, its accuracy on held-out images, and the floor of its FD, the distance between those
held-out real images and the reference. Samples are compared with the same reference, made from the images the
judge trained on, so the floor is what a model that draws exactly the data would score with as many samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time

import numpy as np
import torch

from difftool.errors import UserError
from difftool.evaluation.evaluate import Scorer
from difftool.evaluation.features import extract, load_extractor
from difftool.evaluation.judge import (
    JudgeReport,
    fd_noise,
    held_out_split,
    judgeable,
    paired_fd_noise,
    save_judge,
    train_judge,
)
from difftool.evaluation.metrics import frechet_distance, gaussian_stats
from difftool.progress import say
from difftool.safeio import IMAGE_LIMIT, atomic_path, check_regular, read_bounded, read_json, write_text
from difftool.rundir import RunDir, run_of

JUDGE_FILE, JUDGE_RECORD = "judge.pt", "judge.json"
FEATURES_DIR = "features"  # in RUN/eval: the judge's features of each evaluation's samples, by step
JUDGE = "judge"  # eval.features: the run's own judge


@dataclasses.dataclass
class JudgeFacts:
    """What judge.json holds: how the judge was made, and the floor of its FD for this run's evaluations."""

    report: JudgeReport
    data: dict  # which images it learned: source, count, resolution, flips
    network: str  # the extractor name (by the file's content)
    floor: float = 0.0
    floor_std: float = 0.0
    floor_images: int = 0
    data_mean: float = 0.0  # mean pixel of the data (0-255), as the evaluator measured it for the brightness error

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "report": dataclasses.asdict(self.report)}

    @classmethod
    def from_json(cls, record: dict) -> JudgeFacts:
        return cls(**{**record, "report": JudgeReport(**record["report"])})


def check_judgeable(cfg, data) -> None:
    """Refuse, before anything is written, data the judge cannot learn."""
    problem = judgeable(len(data), data.labels, data.label_names, cfg.data.resolution)
    if problem:
        raise UserError(f"eval.features=judge: {problem}; use --set eval.features=inception (needs the FID weights)")


def prepare_judge(cfg, run, data, images: torch.Tensor, scorer: Scorer) -> tuple[JudgeFacts, torch.Tensor, torch.Tensor]:
    """The run's judge in `scorer.extractor` (trained, or reused from RUN/eval when it learned these very images)
    and its facts; also the held-out rows of `images` (the floor's) and those the judge trained on (the
    reference's)."""
    held, train = held_out_split(len(images), cfg.eval.num_samples)
    described = {"source": data.source, "count": len(images), "resolution": cfg.data.resolution,
                 "flips": cfg.data.random_flip, "classes": data.label_names if data.labels is not None else None}
    facts, origin = _reuse(run, described), run
    if facts is None:
        facts, origin = _adopt_teachers(cfg, run, described)
    if facts is None:
        module, report = train_judge(images, data.labels, data.label_names, held=held, train=train,
                                     flips=cfg.data.random_flip is True)
        path = run.eval_dir / JUDGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(save_judge(module))
        scorer.extractor = _load(run)
        facts = JudgeFacts(report, described, scorer.extractor.name)
        say(f"judge: {report.describe()}; trained in {report.seconds:.0f} s, saved as {path}", highlight=False)
    else:
        scorer.extractor = _load(run)
        say(f"judge: {facts.report.describe()} (reused {origin.eval_dir / JUDGE_FILE})", highlight=False)
    return facts, held, train


def measure_floor(facts: JudgeFacts, run, images: torch.Tensor, held: torch.Tensor, scorer: Scorer,
                  num_samples: int) -> None:
    """The FD of `num_samples` held-out real images (or all there are) to the reference: the judge's floor."""
    start = time.perf_counter()
    rows = held[:num_samples]
    found = extract(scorer.extractor, (images[rows[i : i + 256]] for i in range(0, len(rows), 256)))
    facts.floor = frechet_distance(gaussian_stats(found.features), scorer.reference.stats)
    facts.floor_std = fd_noise(found.features, scorer.reference.stats)
    facts.floor_images = len(rows)
    write_text(run.eval_dir / JUDGE_RECORD, json.dumps(facts.to_json(), indent=2) + "\n")
    note = "" if len(rows) == num_samples else f" (eval.num_samples is {num_samples}: the floor is higher there)"
    say(f"judge: FD of {len(rows)} held-out real images to the reference {facts.floor:.3g} ± {facts.floor_std:.2g}, "
        f"the floor of FD_judge{note} ({time.perf_counter() - start:.0f} s)", highlight=False)


def flips_of(cfg, facts: JudgeFacts | None) -> tuple[bool, str]:
    """What `data.random_flip: auto` means for this run, and why: off where the judge found that the classes have a
    handedness (a mirrored letter is another glyph), on where it found none or could not look (no classes, or no
    judge: flips double what the model sees of images that look alike mirrored)."""
    report = facts.report if facts is not None else None
    if report is None or report.handed is None:
        return True, ("on: no classifier of the data measured whether its images have a handedness "
                      "(that needs class subfolders and eval.features: judge)")
    measured = (f"the judge is {report.accuracy:.0%} right on held-out images and {report.mirrored_accuracy:.0%} "
                f"on them mirrored")
    if report.handed:
        return False, f"off: {measured}, so the classes have a handedness that flips would teach the model to break"
    return True, f"on: {measured}, so mirrored images look like the data"


def read_facts(run) -> JudgeFacts | None:
    """judge.json of a run, None when there is none or it is damaged."""
    with contextlib.suppress(UserError, OSError, ValueError, KeyError, TypeError):
        return JudgeFacts.from_json(read_json(run.eval_dir / JUDGE_RECORD))
    return None


def _reuse(run, described: dict) -> JudgeFacts | None:
    """The facts of a judge already in the run that learned the `described` images, if its file is intact."""
    facts = read_facts(run)
    if facts is None or facts.data != described:
        return None
    with contextlib.suppress(UserError):
        check_regular(run.eval_dir / JUDGE_FILE)
        if _load(run).name == facts.network:
            return facts
    return None


def _adopt_teachers(cfg, run, described: dict) -> tuple[JudgeFacts | None, RunDir | None]:
    """A distillation judges with its teacher run's judge when it learned the same images: the student's figures
    are then the teacher's measure, and no second judge is trained. Copied into the run, which stays whole."""
    found = run_of(cfg.distill.teacher) if cfg.distill.teacher else None
    teacher_run = RunDir(found) if found else None
    facts = _reuse(teacher_run, described) if teacher_run is not None else None
    if facts is not None:
        run.eval_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.eval_dir / JUDGE_FILE) as tmp:
            tmp.write_bytes(read_bounded(teacher_run.eval_dir / JUDGE_FILE, IMAGE_LIMIT))
        write_text(run.eval_dir / JUDGE_RECORD, json.dumps(facts.to_json(), indent=2) + "\n")
    return facts, teacher_run


def _load(run):
    extractor = load_extractor(str(run.eval_dir / JUDGE_FILE), probe_resolution=None)
    if extractor.judge is None:
        raise UserError(f"{run.eval_dir / JUDGE_FILE} is not a judge; remove it and train again")
    return extractor



def keep_features(run, step: int, scorer: Scorer, samples: np.ndarray) -> None:
    """The judge's features of the samples (uint8 N×H×W×C) of the evaluation at `step`, kept in RUN/eval/features
    (64 floats an image) so that later evaluations, resumed ones included, are compared with it pair by pair."""
    images = torch.from_numpy(samples).permute(0, 3, 1, 2)
    found = extract(scorer.extractor, (images[i : i + 256] for i in range(0, len(images), 256)))
    path = run.eval_dir / FEATURES_DIR / f"step-{step:06d}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, found.features.astype(np.float32))


def difference_noise(run, scorer: Scorer, a: int, b: int) -> float | None:
    """The noise of FD(step a) - FD(step b) (paired: the same seeds), None where either's features are not kept."""
    try:  # bounded, no link, no FIFO: a file put in the run folder cannot hang or swell the run
        found = [np.load(io.BytesIO(read_bounded(run.eval_dir / FEATURES_DIR / f"step-{step:06d}.npy", IMAGE_LIMIT)),
                         allow_pickle=False) for step in (a, b)]
    except (UserError, OSError, ValueError, EOFError):
        return None
    if found[0].shape != found[1].shape or found[0].ndim != 2:
        return None
    return paired_fd_noise(found[0].astype(np.float64), found[1].astype(np.float64), scorer.reference.stats)
