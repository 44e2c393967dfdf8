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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr

from difftool import config as config_mod
from difftool.allocator import keep_freed_memory
from difftool.checkpoints import INFO_FILE, LoadedModel, export_pipeline, load_model, load_pickle, model_info
from difftool.compiling import check_can_compile
from difftool.conditions import resolve_guidance_rescale
from difftool.config import Config
from difftool.data import ImageData, data_folder, load_dataset, make_batch
from difftool.errors import (
    UserError,
    first_line,
    is_storage_error,
    os_errors_of_writers,
    storage_problem,
)
from difftool.images import enlarge, make_grid, save_png
from difftool.models import build_noise_scheduler, build_unet, count_parameters
from difftool.plan import check_folder_path, check_output
from difftool.progress import TrainingProgress, console
from difftool.rundir import (
    PROGRESS_FILE,
    RunDir,
    append_jsonl,
    damaged_checkpoint,
    describe_versions,
    fsync_tree,
    made_by,
    read_progress,
    refuse_inputs_as_output,
    remove_tree,
    write_text,
)
from difftool.runlock import main_process_lock, on_main_process
from difftool.sample import denoise, image_generators, initial_noise, to_uint8
from difftool.schedulers import make_scheduler

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
    accelerator = _make_accelerator(cfg, run)
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
    micro_batch = _micro_batch_size(cfg, accelerator.num_processes)
    check_output(run, cfg, resume, overwrite)
    # Read before the data, so that a wrong path fails at once; a resumed run has its own weights.
    start_weights = load_model(cfg.train.init_from) if cfg.train.init_from and resume is None else None
    data = _load_data(accelerator, cfg)
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
        accelerator.init_trackers("difftool", config=_flat_config(cfg))

    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, resolution=cfg.data.resolution, channels=data.channels, num_classes=num_classes)
    if start_weights is not None:
        _load_start_weights(unet, start_weights)
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
        _load_state(accelerator, resume)
        progress = read_progress(resume)
        start_step = progress["step"]
        # At max_steps with no model/ of that step, the run was killed while exporting: finish that.
        if start_step > max_steps or (start_step == max_steps and _exported_step(run) == start_step):
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
        self.nonfinite = _NonFiniteSteps(0 if fp16 else cfg.train.skip_nonfinite, announce=accelerator.is_main_process)

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
        window = _Window(self.device)
        step, last_loss = start_step, None
        with _StopOnSignal(self), progress:
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

    def report(self, step: int, window: _Window, progress: TrainingProgress) -> float | None:
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
                generators = image_generators(cfg.seed, range(n))
                res = self.cfg.data.resolution
                noise = initial_noise(generators, (self.data.channels, res, res), self.device)
                scheduler = make_scheduler(cfg.scheduler, self.noise_scheduler.config, steps=cfg.steps)
                guidance = cfg.guidance_scale if labels is not None else 1.0
                rescale = resolve_guidance_rescale(None, cfg.guidance_rescale, guidance)
                with acc.autocast():
                    x = denoise(unet, scheduler, noise, steps=cfg.steps, generators=generators, class_labels=labels,
                                null_class=self.info["null_class"], guidance_scale=guidance, guidance_rescale=rescale)
                # Tiles of at least 64 px (nearest-neighbour): 32-px samples are too small to judge.
                grid = make_grid(enlarge(to_uint8(x), max(1, 64 // res)), ncol=num_classes or None)
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


def resolve_precision(requested: str, on_cpu: bool) -> str:
    """`auto` means bf16 where the hardware computes it natively, else fp32 ("no").

    On CPUs, bf16 autocast pays off only with AVX512-BF16 or AMX (about 2x on the quickstart
    model); elsewhere it is emulated and slower than fp32.
    """
    if requested != "auto":
        return requested
    if not on_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "no"


def _make_accelerator(cfg: Config, run: RunDir) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, on_cpu)
    if on_cpu and precision == "fp16":
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16, auto or no")
    if cfg.train.compile:
        check_can_compile(torch.device("cpu" if on_cpu else "cuda"), "train.compile=true")
    # accelerate keeps the precision and compile settings of the first Accelerator of a process: a later
    # one with another precision raised, and one asking for compilation silently ran eagerly. Each run
    # starts from its own; the process state (devices, process group) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        log_with=list(cfg.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs_dir)),
        dynamo_backend="inductor" if cfg.train.compile else None,
    )


def _flat_config(cfg: Config) -> dict:
    """Trackers want scalar hyper-parameters: `section.key` -> number/string/bool."""
    flat = {}
    for section, values in config_mod.to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _load_data(accelerator: Accelerator, cfg: Config) -> ImageData:
    """The main process loads first (filling the cache the others then read)."""
    data = on_main_process(accelerator, lambda: load_dataset(cfg.data))
    return data if accelerator.is_main_process else load_dataset(cfg.data)


def _exported_step(run: RunDir) -> int | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((run.model_dir / INFO_FILE).read_text()).get("step")
    return None


def _load_start_weights(unet: UNet2DModel, start: LoadedModel) -> None:
    """`train.init_from`'s weights into the UNet the recipe built, refused unless every tensor matches."""
    have = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in start.unet.state_dict().items()}
    differ = sorted(k for k in have.keys() | given.keys() if have.get(k) != given.get(k))
    if differ:
        key = differ[0]
        raise UserError(f"train.init_from {start.source} is not the UNet this recipe builds ({len(differ)} tensors "
                        f"differ, e.g. {key}: {given.get(key, 'absent')} there, {have.get(key, 'absent')} here); "
                        f"train with the model settings, resolution, channels and classes it was trained with")
    unet.load_state_dict(start.unet.state_dict())


def _load_state(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore model, optimizer, EMA, LR schedule and RNG; a failure says whether versions or damage are why.

    accelerate unpickles the registered objects' states (LR schedule, EMA) with weights_only=False,
    which would run code planted in a checkpoint; each is first read with the loader that refuses code.
    """
    for state in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        load_pickle(state)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # whatever fails inside accelerate/torch, the remedy is the same
        written_by, this = describe_versions(read_progress(checkpoint)), describe_versions(made_by())
        problem = f"cannot resume from {checkpoint} ({type(err).__name__}: {first_line(err)})"
        if written_by != this:
            raise UserError(f"{problem}; it was written by {written_by} and this is {this}. Install those versions "
                            f"to resume it; its weights can still be sampled and converted") from err
        raise damaged_checkpoint(checkpoint, f"it does not load ({type(err).__name__}: {first_line(err)})") from err


def _micro_batch_size(cfg: Config, world: int) -> int:
    per_step = world * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not split over {world} process(es) x "
            f"{cfg.train.grad_accum} accumulation step(s); use a multiple of {per_step}")
    return cfg.train.batch_size // per_step


class _Window:
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


class _NonFiniteSteps:
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
            console.print(f"[yellow]warning:[/] step {step + 1}: non-finite gradients (loss {loss.item():.4g}); "
                          f"update skipped ({self.streak} in a row, at most {self.limit})", highlight=False)
        return True


class _StopOnSignal:
    """Ctrl-C and SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self, trainer: _Trainer):
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


if __name__ == "__main__":
    from difftool.cli.app import run_single_command

    run_single_command("train")
