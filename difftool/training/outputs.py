"""What a training run writes besides its metrics: checkpoints, preview grids and the exported model.

Each is written under a temporary name and renamed when complete (see rundir.py); previews and the
export use the EMA weights, swapped in and back out around the write.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from diffusers import UNet2DModel

from difftool.errors import os_errors_of_writers
from difftool.images import save_png
from difftool.models.export import export_pipeline
from difftool.progress import say
from difftool.rundir import PROGRESS_FILE
from difftool.versions import made_by
from difftool.safeio import atomic_dir, fsync_tree, temporary_dir
from difftool.sampling.job import grid_of, sample_batch
from difftool.sampling.trajectory import Trajectory
from difftool.sampling.loop import NonFiniteSamples
from difftool.sampling.schedulers import check_section_sampler
from difftool.sampling.settings import resolve_sampler


def check_preview_sampler(cfg) -> None:
    """The `sample:` section's sampler, refused before anything is written instead of at the first preview grid."""
    s = cfg.sample
    check_section_sampler("sample", s.scheduler, s.steps, cfg.scheduler.num_train_timesteps, s.eta)


class RunWriter:
    """Writes the run folder's checkpoints, previews and model/ from a run's `TrainingState` (training/state.py)."""

    def __init__(self, state):
        self.state, self.cfg, self.run, self.info = state, state.cfg, state.run, state.info
        self.accelerator, self.ema, self.device = state.accelerator, state.ema, state.device

    def save_checkpoint(self, step: int) -> Path:
        """The training state as checkpoints/step-NNNNNN; the oldest beyond checkpoint.total_limit are removed."""
        final = self.run.checkpoint(step)
        self._save_state(final, step, {})
        if self.accelerator.is_main_process:
            self.run.rotate(self.cfg.checkpoint.total_limit)
        return final

    def save_best(self, step: int, scores: dict) -> Path:
        """The training state as checkpoints/best, `scores` (the evaluation that made it best) in its progress
        record; a folder like any step-NNNNNN, which rotation and --resume pass over."""
        return self._save_state(self.run.best_checkpoint, step, {"eval": scores})

    def _save_state(self, final: Path, step: int, extra: dict) -> Path:
        """accelerate state (every process saves its part) in a temporary folder that takes the place of `final`
        when complete (safeio.atomic_dir: an older `final` is replaced only then)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = atomic_dir(final) if acc.is_main_process else contextlib.nullcontext(temporary_dir(final))
        with folder as tmp, os_errors_of_writers(final):  # a full disk leaves no partial checkpoint behind
            acc.wait_for_everyone()  # the main process has made `tmp`
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.ema is not None:
                    self.ema.save_pretrained(str(tmp / "unet_ema"))
                progress = {"step": step, "epoch": step / self.state.steps_per_epoch, **self.state.nonfinite.state(),
                            **self.state.until.state(), **made_by(), **self.info, **extra}
                (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
                fsync_tree(tmp)  # on disk before it is named complete: survives a power cut, not only a kill
        if acc.is_main_process:
            fsync_tree(final.parent, files=False)
        acc.wait_for_everyone()
        return final

    def bare_unet(self) -> UNet2DModel:
        """The UNet without DDP or torch.compile wrappers: what gets sampled and saved."""
        return self.state.bare_unet()

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
                config = self.state.noise_scheduler.config
                sampler = resolve_sampler(self.info, config, cfg, seed=cfg.seed)
                traced = Trajectory(cfg.trajectory) if cfg.trajectory else None
                try:
                    with acc.autocast():
                        images = sample_batch(unet, config, self.info, sampler, list(range(n)), device=self.device,
                                              trajectory=traced)
                except NonFiniteSamples as err:  # a preview is not worth the run: say so and train on
                    say(f"[yellow]warning:[/] step {step}: no sample grid ({cfg.scheduler}): {err.broken} of "
                        f"{err.total} preview images came out NaN or infinite")
                else:
                    settings = {"step": step, "scheduler": sampler.scheduler, "steps": sampler.steps,
                                "seed": sampler.seed, "weights": "ema", "guidance_scale": sampler.guidance_scale,
                                "guidance_rescale": sampler.guidance_rescale}
                    save_png(grid_of(images, self.info["num_classes"] or None), self.run.sample_grid(step),
                             {k: str(v) for k, v in settings.items()})
                    if traced is not None:
                        save_png(traced.strip(0), self.run.trajectory_strip(step),
                                 {k: str(v) for k, v in settings.items()})
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
                export_pipeline(self.run.model_dir, unet=ema_unet, raw_state=raw, scheduler=self.state.noise_scheduler,
                                info={**self.info, "step": self.state.until.end(), **made_by()})
            finally:
                self.restore_weights(unet)
        acc.wait_for_everyone()
        return self.run.model_dir
