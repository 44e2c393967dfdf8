"""One optimizer step of training: the data order, the randomness of a step, the loss and the update.

Every random draw comes from (seed, step), so that a resumed run makes the very steps an uninterrupted
one would, whatever the number of processes or accumulation steps.
"""

from __future__ import annotations

import contextlib
import math

import torch

from difftool.data import make_batch


class Stepper:
    """One step of a run's `TrainingState` (training/state.py): the model, its optimiser and EMA, what it minimises,
    and the data, which a step reads and changes."""

    def __init__(self, state):
        self.state, self.cfg, self.accelerator, self.data = state, state.cfg, state.accelerator, state.data
        self.device = state.device
        self._perm_epoch, self._perm = -1, None

    # ------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's indices for `step`: a seeded permutation per epoch, sliced per rank."""
        epoch, position = divmod(step, self.state.steps_per_epoch)
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
        cfg, acc, state = self.cfg, self.accelerator, self.state
        # Model-internal randomness (dropout) and random crops come from (seed, step, rank).
        seed = (cfg.train.seed * 1_000_003 + step) * 4099 + acc.process_index
        torch.manual_seed(seed)
        crops = torch.Generator().manual_seed(seed)
        shared = self.step_randomness(step)
        state.objective.begin_step(step)
        indices = self.batch_indices(step)
        accum = cfg.train.grad_accum
        total = torch.zeros((), device=self.device)
        state.unet.train()
        for micro in range(accum):
            part = slice(micro * state.micro_batch, (micro + 1) * state.micro_batch)
            start = acc.process_index * state.micro_batch * accum + part.start
            mine = slice(start, start + state.micro_batch)  # this slice of the global batch
            x0, labels = make_batch(self.data, indices[part], resolution=cfg.data.resolution, random_flip=False,
                                    crop=cfg.data.crop, generator=crops)
            x0 = x0.to(self.device, non_blocking=True)
            x0 = torch.where(shared["flip"][mine, None, None, None], x0.flip(-1), x0)
            if labels is not None and cfg.model.class_conditional:
                labels = labels.to(self.device)
                labels = torch.where(shared["drop"][mine], torch.full_like(labels, len(self.data.label_names)), labels)
            else:
                labels = None
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(state.unet)
            with sync:
                loss = state.objective.loss(state.unet, x0, labels, shared["noise"][mine], shared["t"][mine])
                acc.backward(loss / accum)
            total += loss.detach() / accum
        # Without clipping, an infinite max norm measures the gradients and leaves them as they are.
        clip = cfg.train.grad_clip or (math.inf if state.nonfinite.limit else 0)
        norm = acc.clip_grad_norm_(state.unet.parameters(), clip) if clip else None
        if state.nonfinite.limit and state.nonfinite.skip(step, norm, total, state.last_checkpoint()):
            state.optimizer.zero_grad(set_to_none=True)
            return None
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.objective.after_step()
        if state.ema is not None:
            state.ema.step(state.unet.parameters())
        return total
