"""What a run trains with: built once (`build_state`), then passed openly to the step, the writer of the run
folder, the evaluator and the loop, so none of them reaches into another for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from difftool.config import Config
from difftool.data import ImageData
from difftool.models.build import build_noise_scheduler, build_unet
from difftool.models.checkpoints import LoadedModel
from difftool.models.export import model_info
from difftool.rundir import RunDir
from difftool.training.guards import NonFiniteSteps
from difftool.training.objective import MakeObjective, Objective
from difftool.training.setup import load_start_weights
from difftool.training.until import Plateau, until_of

LR_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainingState:
    """The model and everything that changes it, the data, and the rules of this run."""

    cfg: Config
    run: RunDir
    accelerator: Accelerator
    data: ImageData
    info: dict  # what the exported model records beside its weights (model/difftool.json)
    unet: torch.nn.Module  # as accelerate prepared it (DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    noise_scheduler: DDPMScheduler
    objective: Objective
    until: object  # the train.until rule (training/until.py), with its state
    nonfinite: NonFiniteSteps  # train.skip_nonfinite, with its state
    micro_batch: int
    steps_per_epoch: int

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def bare_unet(self) -> UNet2DModel:
        """The UNet without DDP or torch.compile wrappers: what gets sampled and saved."""
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)

    def release_model(self) -> None:
        """Drop the (DDP-wrapped) model while every process is still there, before accelerate ends the process
        group: a DDP model freed after that (when `train` returns) waits forever in its gloo destructor for a
        process that has already left."""
        self.accelerator.free_memory()
        self.unet = None

    def last_checkpoint(self) -> str:
        """The newest complete checkpoint, as errors and warnings name it."""
        return str(self.run.latest_checkpoint() or "none yet")


def build_state(cfg: Config, run: RunDir, accelerator: Accelerator, data: ImageData, micro_batch: int, *,
                start_weights: LoadedModel | None, make_objective: MakeObjective) -> TrainingState:
    """The UNet the recipe builds (with `start_weights`), its optimiser, LR schedule, EMA and objective, prepared by
    accelerate and registered for its checkpoints."""
    num_classes = len(data.label_names) if cfg.model.class_conditional else None
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
    until = until_of(cfg, max_steps)
    lr_scheduler = _lr_schedule(cfg, optimizer, until, max_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema.max_decay, use_ema_warmup=True, inv_gamma=cfg.ema.inv_gamma,
                   power=cfg.ema.power, update_after_step=cfg.ema.update_after_step, foreach=True,
                   model_cls=UNet2DModel, model_config=unet.config) if cfg.ema.enabled else None
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    objective = make_objective(accelerator, accelerator.unwrap_model(unet), noise_scheduler)
    # The LR scheduler is stepped by hand once per optimizer step, so it is not `prepare`d
    # (accelerate would step it once per process); it is saved with the state all the same.
    accelerator.register_for_checkpointing(lr_scheduler, *([ema] if ema else []), *objective.saved())
    # Under fp16 the loss scaler already skips overflowing steps (and must see them to lower its scale).
    fp16 = accelerator.mixed_precision == "fp16"
    nonfinite = NonFiniteSteps(0 if fp16 else cfg.train.skip_nonfinite, announce=accelerator.is_main_process)
    return TrainingState(cfg, run, accelerator, data, model_info(cfg, data, num_classes), unet, optimizer,
                         lr_scheduler, ema, noise_scheduler, objective, until, nonfinite, micro_batch, steps_per_epoch)


def _lr_schedule(cfg: Config, optimizer, until, max_steps: int):
    """The recipe's lr_schedule over `max_steps`; with train.until: plateau, the rule's own (training/until.py)."""
    if isinstance(until, Plateau):
        # A closure, not the bound method: its state is the rule's (in progress.json), not the LR scheduler's.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: until.lr_factor(step))
    return get_scheduler(LR_SCHEDULE_NAMES[cfg.train.lr_schedule], optimizer, num_warmup_steps=cfg.train.warmup_steps,
                         num_training_steps=max_steps)
