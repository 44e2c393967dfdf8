"""The training loop: accelerate handles devices and processes, the run folder holds the rest.

`train()` builds its own `Accelerator`, so the same function runs in a plain Python process
and under `accelerate launch -m difftool.train` (one process per GPU). Randomness is derived
from (seed, step) at every step rather than carried along, which makes resuming exact: a
resumed run draws the same data order, flips, timesteps and noise as an uninterrupted one,
and no batch has to be re-read to get there.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr

from difftool import config as config_mod
from difftool.allocator import keep_freed_memory
from difftool.models.checkpoints import export_pipeline, model_info
from difftool.models.load import load_model
from difftool.sampling.conditions import resolve_guidance_rescale
from difftool.config import Config
from difftool.training.data import data_folder, make_batch
from difftool.errors import (
    UserError,
    is_storage_error,
    os_errors_of_writers,
    storage_problem,
)
from difftool.images import save_png
from difftool.models.build import build_noise_scheduler, build_unet, count_parameters
from difftool.training.plan import check_folder_path, check_output
from difftool.progress import TrainingProgress, console
from difftool.rundir import (
    PROGRESS_FILE,
    RunDir,
    append_jsonl,
    fsync_tree,
    made_by,
    read_progress,
    refuse_inputs_as_output,
    remove_tree,
    write_text,
)
from difftool.runlock import main_process_lock
from difftool.sampling.job import grid_of, sample_batch
from difftool.training.guards import NonFiniteSteps, StopOnSignal, Window
from difftool.training.setup import (
    exported_step,
    flat_config,
    load_data,
    load_start_weights,
    load_state,
    make_accelerator,
    micro_batch_size,
)

LR_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainResult:
    run: Path
    step: int
    finished: bool
    model_dir: Path | None
    last_loss: float | None


def train(cfg: Config, output: Path | str, *, resume: Path | None = None, overwrite: bool = False,
          show_progress: bool = True, why_recipe: str | None = None) -> TrainResult:
    """Train per `cfg` into the run folder `output`; `resume` is a checkpoint folder of that run.

    `why_recipe`, when difftool chose the recipe, goes into the first line printed.

    The main process holds the run folder's lock throughout, so a second `train` into the same
    folder is refused instead of interleaving checkpoints with this one.
    """
    run = RunDir(output)
    check_folder_path(run.root)
    # replaces: --overwrite clears the run folder, and a data folder inside it with it
    refuse_inputs_as_output(run.root, {"the data": data_folder(cfg.data.dataset)}, replaces=True)
    keep_freed_memory()
    accelerator = make_accelerator(cfg, run)
    try:
        with main_process_lock(accelerator, run.root, "train"):
            return _train_locked(cfg, run, accelerator, resume, overwrite, show_progress, why_recipe)
    except OSError as err:
        if not is_storage_error(err):
            raise
        raise UserError(f"{storage_problem(err)}; the newest complete checkpoint is "
                        f"{run.latest_checkpoint() or 'none yet'}. Free space or fix permissions, then continue "
                        f"with: difftool train --resume {run.root}") from err


def _train_locked(cfg: Config, run: RunDir, accelerator: Accelerator, resume: Path | None, overwrite: bool,
                  show_progress: bool, why_recipe: str | None) -> TrainResult:
    micro_batch = micro_batch_size(cfg, accelerator.num_processes)
    check_output(run, cfg, resume, overwrite)
    # Read before the data, so that a wrong path fails at once; a resumed run has its own weights.
    start_weights = load_model(cfg.train.init_from) if cfg.train.init_from and resume is None else None
    data = load_data(accelerator, cfg)
    labels_used = cfg.model.class_conditional
    if labels_used and data.labels is None:
        raise UserError(f"model.class_conditional is set but {data.source} has no labels; use labelled data or --set model.class_conditional=false")
    num_classes = len(data.label_names) if labels_used else None
    if len(data) < cfg.train.batch_size:
        raise UserError(f"{data.source} has {len(data)} images, fewer than train.batch_size={cfg.train.batch_size}; "
                        f"lower --batch-size or add images")

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
    if cfg.log.trackers:
        accelerator.init_trackers("difftool", config=flat_config(cfg))

    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, resolution=cfg.data.resolution, channels=data.channels, num_classes=num_classes)
    if start_weights is not None:
        load_start_weights(unet, start_weights)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    steps_per_epoch = max(1, len(data) // cfg.train.batch_size)
    max_steps = cfg.train.epochs * steps_per_epoch if cfg.train.epochs else cfg.train.max_steps

    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_epsilon, weight_decay=cfg.train.weight_decay,
        fused=True,  # one kernel for all parameters, on GPUs and (torch >= 2.4) CPUs: 4x faster steps than foreach
    )
    lr_scheduler = get_scheduler(LR_SCHEDULE_NAMES[cfg.train.lr_schedule], optimizer,
                                 num_warmup_steps=cfg.train.warmup_steps, num_training_steps=max_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema.max_decay, use_ema_warmup=True, inv_gamma=cfg.ema.inv_gamma,
                   power=cfg.ema.power, update_after_step=cfg.ema.update_after_step, foreach=True,
                   model_cls=UNet2DModel, model_config=unet.config) if cfg.ema.enabled else None
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    # The LR scheduler is stepped by hand once per optimizer step, so it is not `prepare`d
    # (accelerate would step it once per process); it is saved with the state all the same.
    accelerator.register_for_checkpointing(lr_scheduler, *([ema] if ema else []))

    start_step = 0
    if resume is not None:
        load_state(accelerator, resume)
        progress = read_progress(resume)
        start_step = progress["step"]
        # At max_steps with no model/ of that step, the run was killed while exporting: finish that.
        if start_step > max_steps or (start_step == max_steps and exported_step(run) == start_step):
            raise UserError(f"{run.root} is already trained to step {start_step} (train.max_steps={max_steps}); "
                            f"raise --max-steps to train further")
    info = model_info(cfg, data, num_classes)
    trainer = _Trainer(cfg, run, accelerator, unet, optimizer, lr_scheduler, ema, noise_scheduler, data,
                       micro_batch, steps_per_epoch, info)
    if resume is not None:
        trainer.nonfinite.restore(progress)
    if accelerator.is_main_process:
        trainer.log_start(start_step, max_steps, count_parameters(unet), why_recipe)
    return trainer.run_loop(start_step, max_steps, show_progress)


class _Trainer:
    """State shared by the steps of one training run (kept out of `train` to keep it readable)."""

    def __init__(self, cfg, run, accelerator, unet, optimizer, lr_scheduler, ema, noise_scheduler, data,
                 micro_batch, steps_per_epoch, info):
        self.cfg, self.run, self.accelerator = cfg, run, accelerator
        self.unet, self.optimizer, self.lr_scheduler, self.ema = unet, optimizer, lr_scheduler, ema
        self.noise_scheduler, self.data, self.info = noise_scheduler, data, info
        self.micro_batch, self.steps_per_epoch = micro_batch, steps_per_epoch
        self.device = accelerator.device
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device)
        self._perm_epoch, self._perm = -1, None
        self.stop_requested = False
        # Under fp16 the loss scaler already skips overflowing steps (and must see them to lower its scale).
        fp16 = accelerator.mixed_precision == "fp16"
        self.nonfinite = NonFiniteSteps(0 if fp16 else cfg.train.skip_nonfinite, announce=accelerator.is_main_process)

    # ------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's indices for `step`: a seeded permutation per epoch, sliced per rank."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        size = self.cfg.train.batch_size
        chunk = self._perm[position * size : (position + 1) * size]
        per_rank = size // self.accelerator.num_processes
        return chunk[self.accelerator.process_index * per_rank : (self.accelerator.process_index + 1) * per_rank]

    # ------------------------------------------------------------ one step

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.unet(noisy, t, class_labels=labels).sample
        kind = cfg.scheduler.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else self.noise_scheduler.get_velocity(x0, noise, t)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.train.min_snr_gamma:
            snr = compute_snr(self.noise_scheduler, t)
            clipped = snr.clamp(max=cfg.train.min_snr_gamma)
            weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
            per_image = per_image * weight
        return per_image.mean()

    def step_randomness(self, step: int) -> dict[str, torch.Tensor]:
        """Noise, timesteps, flips and label dropout for the whole global batch of `step`.

        Every process draws the same global values and takes its own slice, so a step gives
        the same gradient whatever the number of processes or accumulation steps.
        """
        cfg = self.cfg
        size, res = cfg.train.batch_size, cfg.data.resolution
        g = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + step)
        return {
            "noise": torch.randn((size, self.data.channels, res, res), generator=g, device=self.device),
            "t": torch.randint(0, cfg.scheduler.num_train_timesteps, (size,), generator=g, device=self.device),
            "flip": torch.rand(size, generator=g, device=self.device) < (0.5 if cfg.data.random_flip else 0.0),
            "drop": torch.rand(size, generator=g, device=self.device) < cfg.model.class_dropout,
        }

    def step(self, step: int) -> torch.Tensor | None:
        """One optimizer step over `grad_accum` micro-batches; the mean loss (on device), None if skipped."""
        cfg, acc = self.cfg, self.accelerator
        # Model-internal randomness (dropout) and random crops come from (seed, step, rank).
        seed = (cfg.train.seed * 1_000_003 + step) * 4099 + acc.process_index
        torch.manual_seed(seed)
        crops = torch.Generator().manual_seed(seed)
        shared = self.step_randomness(step)
        indices = self.batch_indices(step)
        accum = cfg.train.grad_accum
        total = torch.zeros((), device=self.device)
        self.unet.train()
        for micro in range(accum):
            part = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            start = acc.process_index * self.micro_batch * accum + part.start
            mine = slice(start, start + self.micro_batch)  # this slice of the global batch
            x0, labels = make_batch(self.data, indices[part], resolution=cfg.data.resolution, random_flip=False,
                                    crop=cfg.data.crop, generator=crops)
            x0 = x0.to(self.device, non_blocking=True)
            x0 = torch.where(shared["flip"][mine, None, None, None], x0.flip(-1), x0)
            if labels is not None and cfg.model.class_conditional:
                labels = labels.to(self.device)
                labels = torch.where(shared["drop"][mine], torch.full_like(labels, len(self.data.label_names)), labels)
            else:
                labels = None
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(self.unet)
            with sync:
                loss = self.loss(x0, labels, shared["noise"][mine], shared["t"][mine])
                acc.backward(loss / accum)
            total += loss.detach() / accum
        # Without clipping, an infinite max norm measures the gradients and leaves them as they are.
        clip = cfg.train.grad_clip or (math.inf if self.nonfinite.limit else 0)
        norm = acc.clip_grad_norm_(self.unet.parameters(), clip) if clip else None
        if self.nonfinite.limit and self.nonfinite.skip(step, norm, total, self.last_checkpoint()):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        return total

    # ------------------------------------------------------------ loop

    def run_loop(self, start_step: int, max_steps: int, show_progress: bool) -> TrainResult:
        cfg, acc, run = self.cfg, self.accelerator, self.run
        progress = TrainingProgress(max_steps, start_step, enabled=acc.is_main_process and show_progress)
        window = Window(self.device)
        step, last_loss = start_step, None
        with StopOnSignal(self), progress:
            while step < max_steps:
                window.add(self.step(step), step)
                step += 1
                progress.advance()
                logging = step % cfg.log.every == 0 or step == max_steps
                saving = step % cfg.checkpoint.every == 0 or step == max_steps
                previewing = step % cfg.sample.every == 0 or step == max_steps
                stop = self._agree_to_stop(step)
                if logging or saving or previewing or stop:
                    reported = self.report(step, window, progress)
                    last_loss = last_loss if reported is None else reported
                    if previewing and not stop:
                        self.save_preview(step)
                    if saving or stop:
                        self.save_checkpoint(step)
                    window.reset()  # img/s measures training steps, not previews and checkpoints
                if stop:
                    break
        finished = step >= max_steps
        model_dir = self.export() if finished else None
        acc.end_training()
        if acc.is_main_process:
            progress.finish(step, max_steps, run.root, finished)
        return TrainResult(run.root, step, finished, model_dir, last_loss)

    def report(self, step: int, window: Window, progress: TrainingProgress) -> float | None:
        """Mean loss of the window over all processes (the only host sync); stops on NaN/inf.

        None when every step of the window was skipped as non-finite (there is no loss to show).
        """
        cfg, acc = self.cfg, self.accelerator
        loss = acc.reduce(window.loss, "mean").item() / window.kept if window.kept else None
        if loss is not None and not math.isfinite(loss):
            firsts = acc.gather(window.first_nonfinite.reshape(1))
            first = int(firsts[firsts >= 0].min())
            raise UserError(
                f"loss became {loss} at step {first + 1}; nothing from that step on was saved. Lower train.lr, use "
                f"train.mixed_precision=no, set train.grad_clip, or skip such steps with --skip-nonfinite N "
                f"(last good checkpoint: {self.last_checkpoint()})")
        record = {"step": step, "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                  "img_per_s": window.steps * cfg.train.batch_size / window.seconds(),
                  "epoch": step / self.steps_per_epoch}
        if self.nonfinite.limit:
            record["skipped_steps"] = self.nonfinite.skipped
        if acc.is_main_process:
            append_jsonl(self.run.metrics, record)
            progress.show_metrics(record)
        acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return loss

    def last_checkpoint(self) -> str:
        return str(self.run.latest_checkpoint() or "none yet")

    def _agree_to_stop(self, step: int) -> bool:
        """Whether every process has seen Ctrl-C/SIGTERM (one collective every few steps in DDP)."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested
        if step % 10:
            return False
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # ------------------------------------------------------------ outputs

    def save_checkpoint(self, step: int) -> Path:
        """accelerate state in a temporary folder, renamed to step-NNNNNN when complete."""
        acc, run = self.accelerator, self.run
        final = run.checkpoint(step)
        tmp = final.with_name(f".tmp-{final.name}")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            with os_errors_of_writers(final):
                acc.save_state(str(tmp))
                acc.wait_for_everyone()
                if acc.is_main_process:
                    if self.ema is not None:
                        self.ema.save_pretrained(str(tmp / "unet_ema"))
                    progress = {"step": step, "epoch": step / self.steps_per_epoch, **self.nonfinite.state(),
                                **made_by(), **self.info}
                    (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
                    fsync_tree(tmp)  # on disk before it is named complete: survives a power cut, not only a kill
            if acc.is_main_process:
                remove_tree(final)  # only there when a resumed run passes a step it had saved before
                tmp.rename(final)
                fsync_tree(final.parent, files=False)
                run.rotate(self.cfg.checkpoint.total_limit)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no partial checkpoint behind
            raise
        acc.wait_for_everyone()
        return final

    def bare_unet(self) -> UNet2DModel:
        """The UNet without DDP or torch.compile wrappers: what gets sampled and saved."""
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)

    def eval_unet(self):
        """The bare model with EMA weights swapped in; call `restore_weights` afterwards."""
        unet = self.bare_unet()
        if self.ema is not None:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
        return unet.eval()

    def restore_weights(self, unet) -> None:
        if self.ema is not None:
            self.ema.restore(unet.parameters())

    def save_preview(self, step: int) -> None:
        """A grid of samples from fixed seeds; class-conditional models get one column per class."""
        acc = self.accelerator
        if acc.is_main_process:
            cfg = self.cfg.sample
            unet = self.eval_unet()
            try:
                n = cfg.num_images
                num_classes = self.info["num_classes"]
                labels = torch.arange(n, device=self.device) % num_classes if num_classes else None
                res = self.cfg.data.resolution
                guidance = cfg.guidance_scale if labels is not None else 1.0
                rescale = resolve_guidance_rescale(None, cfg.guidance_rescale, guidance)
                with acc.autocast():
                    images = sample_batch(unet, self.noise_scheduler.config, list(range(n)),
                                          (self.data.channels, res, res), self.device, scheduler=cfg.scheduler, steps=cfg.steps, seed=cfg.seed,
                                          labels=labels, null_class=self.info["null_class"], guidance_scale=guidance,
                                          guidance_rescale=rescale)
                grid = grid_of(images, ncol=num_classes or None)
                settings = {"step": step, "scheduler": cfg.scheduler, "steps": cfg.steps, "seed": cfg.seed,
                            "weights": "ema", "guidance_scale": guidance, "guidance_rescale": rescale}
                save_png(grid, self.run.sample_grid(step), {k: str(v) for k, v in settings.items()})
            finally:
                self.restore_weights(unet)
        acc.wait_for_everyone()

    def export(self) -> Path:
        """The final diffusers pipeline folder: EMA weights in unet/, raw weights in unet_raw/."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            unet = self.bare_unet()
            raw = {k: v.detach().clone() for k, v in unet.state_dict().items()} if self.ema else None
            ema_unet = self.eval_unet()
            try:
                export_pipeline(self.run.model_dir, unet=ema_unet, raw_state=raw, scheduler=self.noise_scheduler,
                                info={**self.info, "step": self.cfg.train.max_steps, **made_by()})
            finally:
                self.restore_weights(unet)
        acc.wait_for_everyone()
        return self.run.model_dir

    def log_start(self, start_step: int, max_steps: int, params: int, why_recipe: str | None) -> None:
        acc, cfg = self.accelerator, self.cfg
        what = "resuming" if start_step else "training"
        start = f" from the weights of {cfg.train.init_from}" if cfg.train.init_from and not start_step else ""
        console.print(
            f"[bold]{what}[/] {cfg.recipe}{f' (chosen: {why_recipe})' if why_recipe else ''} on {self.data.source}"
            f"{start}: "
            f"{params / 1e6:.2f}M-parameter UNet at "
            f"{cfg.data.resolution}px, batch {cfg.train.batch_size} over {acc.num_processes} process(es) on "
            f"{acc.device.type} ({acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}), "
            f"steps {start_step}->{max_steps} -> {self.run.root}")
