"""The training loop: accelerate handles devices and processes, the run folder holds the rest.

`train()` builds its own `Accelerator`, so the same function runs in a plain Python process
and under `accelerate launch -m difftool.train` (one process per GPU). Randomness is derived
from (seed, step) at every step rather than carried along, which makes resuming exact: a
resumed run draws the same data order, flips, timesteps and noise as an uninterrupted one,
and no batch has to be re-read to get there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from difftool import config as config_mod
from difftool.allocator import keep_freed_memory
from difftool.models.load import load_model
from difftool.config import Config
from difftool.config_rules import AUTO
from difftool.safeio import append_jsonl, refuse_file_in_the_way, write_text
from difftool.data import data_folder
from difftool.errors import (
    UserError,
    is_storage_error,
    storage_problem,
)
from difftool.models.build import count_parameters
from difftool.training.outputs import RunWriter, check_preview_sampler
from difftool.training.plan import check_output, resume_command
from difftool.training.evaluator import Evaluator, check_evaluation
from difftool.training.judging import flips_of
from difftool.training.objective import Denoising, MakeObjective
from difftool.training.step import Stepper
from difftool.training.state import TrainingState, build_state
from difftool.progress import TrainingProgress, say
from difftool.output_rules import refuse_inputs_as_output
from difftool.rundir import RunDir, read_progress
from difftool.runlock import main_process_lock
from difftool.sessions import FINISHED, STOPPED, training_session
from difftool.threads import cpu_share, describe, rebalance
from difftool.training.guards import EvaluationStopped, Slowdown, StopOnSignal, Window
from difftool.training.setup import (
    exported_step,
    flat_config,
    hardware,
    load_data,
    load_state,
    make_accelerator,
    micro_batch_size,
)

@dataclass
class TrainResult:
    run: Path
    step: int
    finished: bool
    model_dir: Path | None
    last_loss: float | None


def train(cfg: Config, output: Path | str, *, resume: Path | None = None, overwrite: bool = False,
          why_recipe: str | None = None, optional_eval: bool = False,
          objective: MakeObjective | None = None) -> TrainResult:
    """Train per `cfg` into the run folder `output`; `resume` is a checkpoint folder of that run.

    `objective` makes what the steps minimise from (accelerator, the bare UNet, the noise schedule): the diffusion
    loss when None; a distillation passes its own (difftool/distilling), and only a distillation run (one with a
    distill.teacher) may.

    `why_recipe`, when difftool chose the recipe, goes into the first line printed. `optional_eval`: the
    evaluation during training comes from a built-in recipe, not from the user, so a feature network that
    cannot be had turns it off (with one line saying why) instead of refusing the run.

    The main process holds the run folder's lock throughout, so a second `train` into the same
    folder is refused instead of interleaving checkpoints with this one.
    """
    if (objective is None) != (cfg.distill.teacher is None):
        raise UserError(f"{output} is a distillation of {cfg.distill.teacher}: continue it with difftool distill"
                        if objective is None else "a distillation needs distill.teacher (difftool distill TEACHER)")
    run = RunDir(output)
    refuse_file_in_the_way(run.root)
    # replaces: --overwrite clears the run folder, and a data folder or start weights inside it with it
    inputs = {"the data": data_folder(cfg.data.dataset)}
    if resume is None:  # a resumed run keeps its folder: its own weights may well be the start weights
        inputs["train.init_from"] = cfg.train.init_from
    inputs["the teacher"] = cfg.distill.teacher
    refuse_inputs_as_output(run.root, inputs, replaces=True)
    keep_freed_memory()
    accelerator = make_accelerator(cfg, run)
    try:
        with main_process_lock(accelerator, run.root, "train"), cpu_share():
            session = _Session(resume, overwrite, why_recipe, optional_eval)
            return _train_locked(cfg, run, accelerator, session,
                                 objective or (lambda _acc, _unet, schedule: Denoising(cfg, schedule)))
    except OSError as err:
        if not is_storage_error(err):
            raise
        raise UserError(f"{storage_problem(err)}; the newest complete checkpoint is "
                        f"{run.latest_checkpoint() or 'none yet'}. Free space or fix permissions, then continue "
                        f"with: difftool {resume_command(cfg)} --resume {run.root}") from err


@dataclass(frozen=True)
class _Session:
    """How this `train` call runs: from where, over what, and what it prints (see `train`)."""

    resume: Path | None
    overwrite: bool
    why_recipe: str | None
    optional_eval: bool


def _train_locked(cfg: Config, run: RunDir, accelerator: Accelerator, session: _Session,
                  make_objective: MakeObjective) -> TrainResult:
    resume = session.resume
    micro_batch = micro_batch_size(cfg, accelerator.num_processes)
    check_output(run, cfg, resume, session.overwrite)
    # Read before the data, so that a wrong path fails at once; a resumed run has its own weights.
    start_weights = load_model(cfg.train.init_from) if cfg.train.init_from and resume is None else None
    data = load_data(accelerator, cfg)
    if cfg.model.class_conditional == AUTO:  # decided here, so the run's config.yaml records true or false
        cfg.model.class_conditional = data.labels is not None and len(data.label_names) > 1
    if cfg.model.class_conditional and data.labels is None:
        raise UserError(f"model.class_conditional is set but {data.source} has no labels; use labelled data or --set model.class_conditional=false")
    if len(data) < cfg.train.batch_size:
        raise UserError(f"{data.source} has {len(data)} images, fewer than train.batch_size={cfg.train.batch_size}; "
                        f"lower --batch-size or add images")
    check_preview_sampler(cfg)
    scorer, eval_note = check_evaluation(cfg, accelerator, data, optional=session.optional_eval)
    _prepare_folder(cfg, run, accelerator, resume, session.overwrite)
    if cfg.log.trackers:
        accelerator.init_trackers("difftool", config=flat_config(cfg))

    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = build_state(cfg, run, accelerator, data, micro_batch, start_weights=start_weights,
                        make_objective=make_objective)
    start_step = 0
    if resume is not None:
        load_state(accelerator, resume)
        progress = read_progress(resume)
        start_step = progress["step"]
        state.until.restore(progress)
        state.nonfinite.restore(progress)
        # At the end with no model/ of that step, the run was killed while exporting: finish that.
        end = state.until.end()
        if start_step > end or (start_step == end and exported_step(run) == start_step):
            budget = cfg.train.epochs * state.steps_per_epoch if cfg.train.epochs else cfg.train.max_steps
            raise UserError(f"{run.root} is already trained to step {start_step} (train.max_steps={budget}"
                            f"{', and train.until: plateau stopped it' if end != budget else ''}); "
                            f"raise --max-steps to train further")
    trainer = _Trainer(state)
    if accelerator.is_main_process:
        trainer.log_start(start_step, count_parameters(state.unet), session.why_recipe)
        if eval_note:
            say(eval_note, highlight=False)
    evaluator = Evaluator(state, trainer.outputs, scorer) if cfg.eval.every else None
    if evaluator is not None:
        evaluator.prepare(data, resumed=resume is not None)
    if cfg.data.random_flip == AUTO:  # decided by the judge, the same way again on --resume (it is reused)
        cfg.data.random_flip, why = evaluator.flips() if evaluator is not None else flips_of(cfg, None)
        if accelerator.is_main_process:
            say(f"data.random_flip auto: {why}", highlight=False)
    return trainer.run_session(start_step, resume, evaluator)


def _prepare_folder(cfg: Config, run: RunDir, accelerator: Accelerator, resume: Path | None, overwrite: bool) -> None:
    """The run folder as the run starts: replaced (--overwrite), its config written, or (--resume) its
    temporaries cleared and its metrics cut back to the checkpoint's step, evaluations included."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and run.is_run() and resume is None:
            run.clear()
        run.clean_temporaries()
        if resume is None:
            write_text(run.config, config_mod.dump_yaml(cfg))
        else:
            run.trim_metrics(read_progress(resume)["step"])
    accelerator.wait_for_everyone()


class _Trainer:
    """The loop of one run: steps (`Stepper`), reports, and the outputs (`RunWriter`) at their intervals."""

    def __init__(self, state: TrainingState):
        self.state = state
        self.stepper = Stepper(state)
        self.outputs = RunWriter(state)
        self.stop_requested = False
        self.step = 0  # the step reached, for the record of a session a second Ctrl-C ends
        self.slowdown = Slowdown()

    # ------------------------------------------------------------ loop

    def run_session(self, start_step: int, resume: Path | None,
                    evaluator: Evaluator | None) -> TrainResult:
        """`run_loop`, recorded as one session in the run's sessions.jsonl (by the main process): when it ran,
        from which step to which, and on what (`difftool report` shows them). A second Ctrl-C (KeyboardInterrupt)
        ends it as stopped too, at the step reached."""
        acc = self.state.accelerator
        self.step = start_step
        with training_session(self.state.run.sessions if acc.is_main_process else None, step=start_step,
                              max_steps=self.state.until.end(), resumed_from=resume.name if resume else None,
                              **hardware(acc)) as end:
            try:
                result = self.run_loop(start_step, evaluator)
            except KeyboardInterrupt:
                end["step"] = self.step
                raise
            end.update(step=result.step, outcome=FINISHED if result.finished else STOPPED)
        return result

    def run_loop(self, start_step: int, evaluator: Evaluator | None) -> TrainResult:
        """Steps to the end the rule sets (train.until), which `plateau` may move at an evaluation."""
        cfg, acc, run = self.state.cfg, self.state.accelerator, self.state.run
        max_steps = self.state.until.end()
        progress = TrainingProgress(max_steps, start_step, enabled=acc.is_main_process)
        window = Window(self.state.device)
        step, last_loss = start_step, None
        with StopOnSignal(self) as guard, progress:
            while step < max_steps:
                rebalance()
                window.add(self.stepper.step(step), step)
                step = self.step = step + 1
                progress.advance()
                logging = step % cfg.log.every == 0 or step == max_steps
                saving = step % cfg.checkpoint.every == 0 or step == max_steps
                previewing = step % cfg.sample.every == 0 or step == max_steps
                evaluating = evaluator is not None and evaluator.due(step, max_steps)
                stop = self._agree_to_stop(step)
                if logging or saving or previewing or evaluating or stop:
                    reported = self.report(step, window, progress)
                    last_loss = last_loss if reported is None else reported
                    if previewing and not stop:
                        self.outputs.save_preview(step)
                    if evaluating and not stop:  # before the checkpoint: it carries the evaluation's rule state
                        stop = self._evaluate(evaluator, step, guard)
                        if self.state.until.end() != max_steps:
                            max_steps = self.state.until.end()
                            progress.set_total(max_steps)
                    if saving or stop:
                        self.outputs.save_checkpoint(step)
                    window.reset()  # img/s measures training steps, not previews, checkpoints and evaluations
                if stop:
                    break
        finished = step >= max_steps
        model_dir = self.outputs.export() if finished else None
        self.state.release_model()
        acc.end_training()
        if acc.is_main_process:
            progress.finish(step, max_steps, run.root, finished, command=resume_command(cfg))
            if finished and evaluator is not None and (line := evaluator.verdict(str(run.root))):
                say(line, highlight=False)
        return TrainResult(run.root, step, finished, model_dir, last_loss)

    def report(self, step: int, window: Window, progress: TrainingProgress) -> float | None:
        """Mean loss of the window over all processes (the only host sync); stops on NaN/inf.

        None when every step of the window was skipped as non-finite (there is no loss to show).
        """
        cfg, acc = self.state.cfg, self.state.accelerator
        loss = acc.reduce(window.loss, "mean").item() / window.kept if window.kept else None
        if loss is not None and not math.isfinite(loss):
            firsts = acc.gather(window.first_nonfinite.reshape(1))
            first = int(firsts[firsts >= 0].min())
            raise UserError(
                f"loss became {loss} at step {first + 1}; nothing from that step on was saved. Lower train.lr, use "
                f"train.mixed_precision=no, set train.grad_clip, or skip such steps with --skip-nonfinite N "
                f"(last good checkpoint: {self.state.last_checkpoint()})")
        record = {"step": step, "loss": loss, "lr": self.state.lr_scheduler.get_last_lr()[0],
                  "img_per_s": window.steps * cfg.train.batch_size / window.seconds(),
                  "epoch": step / self.state.steps_per_epoch}
        if self.state.nonfinite.limit:
            record["skipped_steps"] = self.state.nonfinite.skipped
        if acc.is_main_process:
            append_jsonl(self.state.run.metrics, record)
            progress.show_metrics(record)
            slower = self.slowdown.observe(record["img_per_s"], window.steps)
            if slower:
                say(f"[yellow]warning:[/] {slower}", highlight=False)
        acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return loss

    def _evaluate(self, evaluator: Evaluator, step: int, guard: StopOnSignal) -> bool:
        """Evaluate at `step`, its scores to the trackers (tensorboard, ...) beside the training metrics.

        True when Ctrl-C/SIGTERM cut the evaluation short: the run then stops as after any step, its checkpoint
        of `step` saved.
        """
        try:
            record = evaluator.evaluate(step, abandonable=guard.abandonable)
        except EvaluationStopped:
            say(f"evaluation at step {step} abandoned (Ctrl-C or a signal)", highlight=False)
            return True
        if record is not None:
            self.state.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self._follow_until(evaluator, step, record)
        return False

    def _follow_until(self, evaluator: Evaluator, step: int, record: dict | None) -> None:
        """The evaluation at `step` to the train.until rule (on the main process, which alone has the record),
        and the rule's state to every process: they must all stop at the same step."""
        if record is not None:
            key = evaluator.key()
            decision = self.state.until.observe(step, record[key], record.get(f"{key}_std", 0.0),
                                          paired=evaluator.difference_noise)
            if decision is not None:
                append_jsonl(self.state.run.metrics, decision)
                say(f"train.until: plateau at step {step}: {decision['until/why']}", highlight=False)
        if self.state.accelerator.num_processes > 1:
            shared = [self.state.until.state()]  # the main process's decision, for every process
            broadcast_object_list(shared)
            self.state.until.restore({**shared[0]})

    def _agree_to_stop(self, step: int) -> bool:
        """Whether every process has seen Ctrl-C/SIGTERM (one collective every few steps in DDP)."""
        if self.state.accelerator.num_processes == 1:
            return self.stop_requested
        if step % 10:
            return False
        flag = torch.tensor(float(self.stop_requested), device=self.state.device)
        return bool(self.state.accelerator.reduce(flag, "sum").item() > 0)

    def log_start(self, start_step: int, params: int, why_recipe: str | None) -> None:
        acc, cfg, data = self.state.accelerator, self.state.cfg, self.state.data
        distilling = self.state.objective.describe()
        what = "resuming" if start_step else "distilling" if distilling else "training"
        start = (f" ({distilling})" if distilling else
                 f" from the weights of {cfg.train.init_from}" if cfg.train.init_from and not start_step else "")
        say(
            f"[bold]{what}[/] {cfg.recipe}{f' (chosen: {why_recipe})' if why_recipe else ''} on {data.source}"
            f"{start}: "
            f"{params / 1e6:.2f}M-parameter UNet"
            f"{f' conditioned on {len(data.label_names)} classes' if cfg.model.class_conditional else ''} at "
            f"{cfg.data.resolution}px, batch {cfg.train.batch_size} over {acc.num_processes} process(es) on "
            f"{acc.device.type} ({acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}"
            f"{f'; {shared}' if (shared := describe()) else ''}), "
            f"{self.state.until.describe(start_step)} -> {self.state.run.root}")
