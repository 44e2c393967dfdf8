"""The scheduler registry: short name -> diffusers class and the settings it needs.

Every sampler is built with `from_config` of the checkpoint's training scheduler, so betas,
T and the prediction type always come from training. What differs per sampler is collected
here, in one table, instead of in the sampling loop.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import diffusers

from difftool.config import did_you_mean
from difftool.errors import UserError


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    summary: str
    recommended_steps: int
    aliases: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)


SCHEDULERS = [
    SchedulerSpec("ddpm", "DDPMScheduler", "ancestral DDPM (Ho et al. 2020)", 1000),
    SchedulerSpec("ddim", "DDIMScheduler", "DDIM, deterministic at eta 0 (Song et al. 2021)", 50),
    SchedulerSpec("dpm-solver", "DPMSolverMultistepScheduler", "DPM-Solver++ 2M multistep", 20,
                  aliases=("dpmpp-2m", "dpm++"), settings={"algorithm_type": "dpmsolver++", "solver_order": 2}),
    SchedulerSpec("dpm-solver-sde", "DPMSolverMultistepScheduler", "SDE DPM-Solver++ 2M", 25,
                  settings={"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    SchedulerSpec("dpm-solver-single", "DPMSolverSinglestepScheduler", "DPM-Solver++ singlestep", 20),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC multistep predictor-corrector", 20),
    SchedulerSpec("deis", "DEISMultistepScheduler", "DEIS multistep", 20),
    SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler (Karras et al. 2022)", 30),
    SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", "Euler ancestral", 30, aliases=("euler_a",)),
    SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun 2nd order (two model calls per step)", 25),
    SchedulerSpec("pndm", "PNDMScheduler", "PNDM / PLMS", 50),
]
_BY_NAME = {alias: spec for spec in SCHEDULERS for alias in (spec.name, *spec.aliases)}


def get_spec(name: str) -> SchedulerSpec:
    spec = _BY_NAME.get(name.lower())
    if spec is None:
        raise UserError(f"unknown scheduler '{name}'{did_you_mean(name, list(_BY_NAME))} (difftool schedulers lists them)")
    return spec


def make_scheduler(name: str, training_config: dict, *, steps: int):
    """A sampler for a model trained with `training_config` (a DDPMScheduler config dict).

    The training betas are passed as `trained_betas`, which every multistep scheduler accepts
    even where it would reject the named schedule (sigmoid), and short schedules use
    "trailing" spacing so that the first step starts at t = T - 1, not below it.
    """
    spec = get_spec(name)
    cls = getattr(diffusers, spec.class_name)
    accepted = inspect.signature(cls.__init__).parameters
    base = diffusers.DDPMScheduler.from_config(training_config)
    settings = dict(spec.settings)
    if "trained_betas" in accepted:
        settings["trained_betas"] = base.betas.tolist()
    if "timestep_spacing" in accepted:
        settings["timestep_spacing"] = "trailing" if steps < base.config.num_train_timesteps else "leading"
    if training_config.get("clip_sample") and "clip_sample" not in accepted and "thresholding" in accepted:
        # Solvers without clip_sample keep the DDPM model's [-1, 1] range through thresholding.
        settings.update(thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=1.0)
    if spec.name == "ddpm" and steps > base.config.num_train_timesteps:
        raise UserError(f"ddpm cannot take {steps} steps: the model was trained with {base.config.num_train_timesteps}")
    return cls.from_config(base.config, **settings)


def step_accepts_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters
