"""One optimizer step of training: the data order, the randomness of a step, the loss and the update.

Every random draw comes from (seed, step), so that a resumed run makes the very steps an uninterrupted
one would, whatever the number of processes or accumulation steps.
"""

from __future__ import annotations

import contextlib
import math

import torch

from difftool.data import make_batch
from difftool.training.guards import NonFiniteSteps


class Stepper:
    """The model, its optimiser and EMA, what it minimises, and the data: what a step reads and changes."""

    def __init__(self, cfg, accelerator, unet, optimizer, lr_scheduler, ema, objective, noise_scheduler, data,
                 micro_batch, steps_per_epoch, last_checkpoint):
        self.cfg, self.accelerator = cfg, accelerator
        self.unet, self.optimizer, self.lr_scheduler, self.ema = unet, optimizer, lr_scheduler, ema
        self.objective = objective
        self.noise_scheduler, self.data = noise_scheduler, data
        self.micro_batch, self.steps_per_epoch = micro_batch, steps_per_epoch
        self.last_checkpoint = last_checkpoint  # () -> str, named when a step is skipped
        self.device = accelerator.device
        self._perm_epoch, self._perm = -1, None
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
        self.objective.begin_step(step)
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
                loss = self.objective.loss(self.unet, x0, labels, shared["noise"][mine], shared["t"][mine])
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
        self.objective.after_step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        return total
