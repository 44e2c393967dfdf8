"""Evaluation during training (the recipe's `eval:` section): sample the EMA weights, score, keep the best.

Every `eval.every` steps the EMA weights make `eval.num_samples` images, image i from the seed (eval.seed, i),
so that every evaluation of a run scores the same noise. They are made by the sampling job of `difftool sample`
(whole batches dealt out to the processes, gathered on the main process) into RUN/eval/samples/, and scored there
by `difftool evaluate`'s own `sample_and_score`, with its feature networks and reference statistics. Each
evaluation appends one record to metrics.jsonl (`eval/fid` or `eval/fd...`, `eval/kid`, `eval/kid_std`,
`eval/num_samples`, `eval/seconds`, `eval/best_step`) and goes to the trackers; the state of the best score so
far is kept in checkpoints/best.

The feature network and the reference are checked before the first step: a missing file stops a run then,
not an hour into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from difftool.errors import UserError
from difftool.training.plan import resume_command
from difftool.evaluation import reference as reference_mod
from difftool.evaluation.evaluate import MetricOptions, Scorer, distance_key, resolve_reference, sample_and_score
from difftool.evaluation.features import load_extractor
from difftool.evaluation.imagesets import from_tensor, open_npz
from difftool.evaluation.judge import reference_rows
from difftool.evaluation.verdict import FINISHED, LEVELLED, verdict
from difftool.reporting.judge import teacher_evaluation
from difftool.models.checkpoints import LoadedModel, state_dict_hash
from difftool.progress import say
from difftool.output_rules import Existing
from difftool.rundir import progress_problem, read_progress
from difftool.runlock import on_main_process
from difftool.safeio import append_jsonl, check_regular
from difftool.sampling.folder import NPZ_FILE
from difftool.sampling.job import SampleRequest
from difftool.sampling.schedulers import check_section_sampler
from difftool.data import center_crops
from difftool.config_rules import PLATEAU
from difftool.training.judging import (
    JUDGE,
    JudgeFacts,
    check_judgeable,
    difference_noise,
    flips_of,
    keep_features,
    measure_floor,
    prepare_judge,
)

RUN_DATA = "data"  # eval.reference: the run's own training data
REFERENCE_FILE = "reference.npz"  # in RUN/eval: the statistics of the run's data
SAMPLES_DIR = "samples"  # in RUN/eval: the latest evaluation's samples
REFERENCE_SEED = 0  # which images of the data make the reference when eval.reference_images is fewer


def check_evaluation(cfg, accelerator, data, *, optional: bool) -> tuple[Scorer | None, str | None]:
    """The feature network and (unless it is the run's data) the reference, loaded on the main process before
    anything is written (None elsewhere, and when evaluation is off), and a note for the user, if any.

    A failure stops the run with the remedy, or, when the evaluation is `optional` (a built-in recipe's, not
    asked for by the user), turns evaluation off, the note saying why, and the run trains without it (its
    config.yaml then says eval.every: 0). The caller says the note after the run's first line.
    """
    if not cfg.eval.every:
        return None, None
    try:
        _check_sampler(cfg)
        if cfg.eval.features == JUDGE:  # trained once the run folder is ready (Evaluator.prepare)
            _check_judge(cfg, data)
            return (Scorer(None, None, _metric_options(cfg)) if accelerator.is_main_process else None), None
        return on_main_process(accelerator, lambda: _load_scorer(cfg)), None
    except UserError as err:
        if not optional:
            raise UserError(f"cannot evaluate during training: {err}; or train without evaluation: "
                            f"--set eval.every=0") from None
        cfg.eval.every = 0
        plateau = cfg.train.until == PLATEAU
        if plateau:  # nothing to follow: the rule's learning rate, cooled down to end at the budget
            cfg.train.until_max_steps = cfg.train.max_steps
        return None, (f"[yellow]evaluation during training off:[/] {err}"
                      f"{'; train.until: plateau follows it, so the run ends at train.max_steps' if plateau else ''}")


def _check_sampler(cfg) -> None:
    check_section_sampler("eval", *_sampler(cfg), cfg.scheduler.num_train_timesteps)


def _check_judge(cfg, data) -> None:
    if cfg.eval.reference != RUN_DATA:
        raise UserError(f"eval.features=judge compares samples with the run's own data, not "
                        f"{cfg.eval.reference}: set eval.reference=data")
    check_judgeable(cfg, data)


def _sampler(cfg) -> tuple[str, int | None]:
    """The eval sampler and step count; null ones are the `sample:` section's."""
    if cfg.eval.scheduler is None:
        return cfg.sample.scheduler, cfg.eval.steps or cfg.sample.steps
    return cfg.eval.scheduler, cfg.eval.steps


def _metric_options(cfg) -> MetricOptions:
    return MetricOptions(features=cfg.eval.features, inception_weights=cfg.eval.inception_weights,
                         reference_images=cfg.eval.reference_images)


def _load_scorer(cfg) -> Scorer:
    options = _metric_options(cfg)
    extractor = load_extractor(options.features, inception_weights=options.inception_weights,
                               weights_option="eval.inception_weights")
    extractor.probs = False  # no Inception Score during training: half the feature network's time
    reference = None
    if cfg.eval.reference != RUN_DATA:
        reference = resolve_reference(cfg.eval.reference, extractor, cfg.data.resolution, options)
    return Scorer(extractor, reference, options)


class Evaluator:
    """The evaluations of one run: when, with what, and the best score so far (restored on --resume)."""

    def __init__(self, state, writer, scorer: Scorer | None):
        self.state, self.cfg, self.run, self.writer, self.scorer = state, state.cfg, state.run, writer, scorer
        self.accelerator = state.accelerator
        self.best_step, self.best_score = None, math.inf
        self.judge: JudgeFacts | None = None  # the main process's, with eval.features: judge
        self.data_mean: float | None = None  # of the data (0-255), for the brightness error
        self.last: dict | None = None  # the latest evaluation's record (main process)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.cfg.eval.every == 0 or step == max_steps

    def prepare(self, data, resumed: bool) -> None:
        """Before the first step: the judge (eval.features: judge), the statistics of the run's data (once:
        RUN/eval/reference.npz), and on resume the best score so far, from checkpoints/best."""
        if self.cfg.eval.reference == RUN_DATA:
            on_main_process(self.accelerator, lambda: self._prepare_reference(data))
        if resumed:
            self._restore_best()

    def _prepare_reference(self, data) -> None:
        """The reference from the run's data: the images the judge trained on, when there is one."""
        images = center_crops(data, self.cfg.data.resolution)
        self.data_mean = float(images.float().mean())
        rows = torch.arange(len(images))
        if self.cfg.eval.features == JUDGE:
            self.judge, held, rows = prepare_judge(self.cfg, self.run, data, images, self.scorer)
            self.judge.data_mean = self.data_mean
        self._run_data_reference(data, images, rows)
        if self.judge is not None:
            measure_floor(self.judge, self.run, images, held, self.scorer, self.cfg.eval.num_samples)

    def _run_data_reference(self, data, images: torch.Tensor, rows: torch.Tensor) -> None:
        scorer, path = self.scorer, self.run.eval_dir / REFERENCE_FILE
        count = min(len(rows), self.cfg.eval.reference_images or len(rows))
        with contextlib.suppress(UserError):  # none yet, unreadable, or a link (never read through): made again
            check_regular(path)
            cached = reference_mod.load(path)
            if (cached.extractor, cached.resolution, cached.count) == (scorer.extractor.name, self.cfg.data.resolution,
                                                                       count):
                scorer.reference = cached
                return
        start = time.perf_counter()
        rows = reference_rows(rows, count, REFERENCE_SEED)
        built = reference_mod.from_images(from_tensor(images[rows], f"{data.source} ({count} training images)"),
                                          scorer.extractor, batch_size=scorer.options.batch_size)
        reference_mod.save(built, path)
        scorer.reference = built
        say(f"eval reference: {count} images of {data.source}, statistics cached in {path} "
            f"({time.perf_counter() - start:.0f} s)", highlight=False)

    def _restore_best(self) -> None:
        """The best step and score of checkpoints/best, if it was scored with the settings of this run's
        evaluations (else a note: the next evaluation starts a new best). The main process alone keeps it."""
        best = self.run.best_checkpoint
        if not self.accelerator.is_main_process or progress_problem(best) is not None:  # none (or damaged: replaced)
            return
        progress = read_progress(best)
        scores = progress.get("eval", {})
        if scores.get("settings") != self.settings():
            say(f"[yellow]note:[/] {best} was scored with other eval settings; the next evaluation "
                f"replaces it", highlight=False)
            return
        self.best_step, self.best_score = progress["step"], scores[self.key()]

    def settings(self) -> dict:
        """What decides a score (everything of eval: but how often): scores are compared only within them."""
        return {k: v for k, v in dataclasses.asdict(self.cfg.eval).items() if k != "every"}

    def key(self) -> str:
        """eval/fid (Inception), eval/fd_dinov2, eval/fd: the name `difftool evaluate` gives the distance."""
        name = distance_key(self.scorer.extractor) if self.scorer else "fd"
        return f"eval/{name}"

    # ------------------------------------------------------------ one evaluation

    def evaluate(self, step: int, abandonable=contextlib.nullcontext) -> dict | None:
        """Sample and score the EMA weights at `step` (every process samples its share); the record on the
        main process, None elsewhere. checkpoints/best is replaced when the score is the best so far.

        `abandonable` (the loop's StopOnSignal.abandonable) wraps what Ctrl-C may cut short: sampling, scoring
        and saving checkpoints/best, all written under temporary names; never swapping the training weights
        back, which the checkpoint saved next relies on.
        """
        start = time.perf_counter()
        unet = self.writer.eval_unet()
        try:
            with abandonable():
                done = sample_and_score(str(self.run.model_dir), self._model(unet, step), self._request(),
                                        self.run.eval_dir / SAMPLES_DIR, self.scorer, existing=Existing(overwrite=True),
                                        sampling_precision=self.accelerator.autocast)
        finally:
            self.writer.restore_weights(unet)
        record = None if done is None else self._record(step, done[1], time.perf_counter() - start)
        with abandonable():
            if self._on_every_process(record is not None and record["eval/best_step"] == step):
                self.writer.save_best(step, {**record, "settings": self.settings()} if record else {})
        if record is not None:
            self.last = record
            append_jsonl(self.run.metrics, record)
            say(f"eval step {step}: {self.describe(record)} "
                f"({record['eval/num_samples']} samples, {record['eval/seconds']:.0f} s); best at step "
                f"{self.best_step}", highlight=False)
        return record

    def _record(self, step: int, scores: dict, seconds: float) -> dict:
        """The metrics.jsonl record of an evaluation (the main process's scores), the best so far updated."""
        score = scores[distance_key(self.scorer.extractor)]
        if score < self.best_score:
            self.best_step, self.best_score = step, score
        record = {"step": step, self.key(): score}
        if "kid_mean" in scores:
            record.update({"eval/kid": scores["kid_mean"], "eval/kid_std": scores["kid_std"]})
        if self.judge is not None:
            record.update({f"{self.key()}_std": scores[f"{self.key()[5:]}_std"], f"{self.key()}_floor": self.judge.floor,
                           **{f"eval/{k}": scores[k] for k in ("right_class", "largest_class_share") if k in scores}})
        if self.data_mean is not None or self.judge is not None:
            with open_npz(self.run.eval_dir / SAMPLES_DIR / NPZ_FILE) as npz:
                samples = npz["arr_0"]
            if self.data_mean is not None:
                record["eval/brightness_error"] = float(samples.mean(dtype=np.float64)) - self.data_mean
            if self.judge is not None:
                keep_features(self.run, step, self.scorer, samples)
        return {**record, "eval/num_samples": scores["num_images"], "eval/seconds": seconds,
                "eval/best_step": self.best_step}

    def difference_noise(self, a: int, b: int) -> float | None:
        """The noise of the difference between the FD_judge of the evaluations at steps a and b (main process)."""
        return difference_noise(self.run, self.scorer, a, b) if self.judge is not None else None

    def verdict(self, run: str) -> str | None:
        """What the latest evaluation says, against what the judge sees in real images (None without a judge)."""
        if self.judge is None or self.last is None:
            return None
        best = {"step": self.best_step, "eval/fd_judge": self.best_score} if self.best_step is not None else None
        return verdict(self.last, self.judge.to_json(), run=run, step=self.last["step"], best=best,
                       command=resume_command(self.cfg),
                       ended=LEVELLED if getattr(self.state.until, "reason", None) == LEVELLED else FINISHED,
                       teacher=teacher_evaluation(self.cfg.distill.teacher))

    def describe(self, record: dict) -> str:
        """One evaluation in words: `FD_judge 0.52 (1.4× its floor), right class 91%, brightness +1.2 levels`."""
        key = self.key()
        name = self.scorer.extractor.distance_name if self.scorer else key[5:].upper()
        text = f"{name} {record[key]:.4g}"
        if f"{key}_floor" in record:
            text += f" ({record[key] / max(record[f'{key}_floor'], 1e-12):.1f}× its floor)"
        if "eval/right_class" in record:
            text += f", right class {record['eval/right_class']:.0%}"
        if "eval/brightness_error" in record:
            text += f", brightness {record['eval/brightness_error']:+.1f} levels"
        return text

    def flips(self) -> tuple[bool, str]:
        """What `data.random_flip: auto` means for this run and why (judging.flips_of), on every process."""
        return self._on_every_process(flips_of(self.cfg, self.judge) if self.accelerator.is_main_process else None)

    def _on_every_process(self, decision):
        """The main process's `decision`, on every process."""
        if self.accelerator.num_processes == 1:
            return decision
        message = [decision]
        broadcast_object_list(message)
        return message[0]

    def _request(self) -> SampleRequest:
        cfg = self.cfg
        scheduler, steps = _sampler(cfg)
        # Guidance not given here is the run's `sample:` section's, resolved as `difftool sample RUN` resolves it.
        guidance = cfg.eval.guidance_scale if cfg.model.class_conditional else None
        return SampleRequest(num_images=cfg.eval.num_samples, scheduler=scheduler, steps=steps, seed=cfg.eval.seed,
                             batch_size=cfg.train.batch_size, guidance_scale=guidance, format="npz")

    def _model(self, unet, step: int) -> LoadedModel:
        """The model being trained, in the form every sampler takes."""
        state = self.state
        weights = "ema" if state.ema is not None else "raw"
        return LoadedModel(unet=unet, scheduler_config=dict(state.noise_scheduler.config), info=state.info,
                           source=f"{self.run.root} at step {step} ({weights} weights)", weights=weights,
                           model_hash=state_dict_hash(unet.state_dict()), notes=[])
