"""The scheduler registry: short name -> diffusers class and the settings it needs.

Every sampler is built with `from_config` of the checkpoint's training DDPMScheduler, so betas,
T and the prediction type always come from training. What differs per sampler is collected
here, in one table, and every option is checked before sampling starts, not mid-loop.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import diffusers
import torch

from difftool.config_rules import PREDICTION_TYPES
from difftool.errors import did_you_mean
from difftool.errors import UserError

SPACINGS = ("leading", "trailing", "linspace")
# The solver grid of consistency distillation (LCM's 50 skipping steps over the training timesteps), on which the
# consistency samplers step.
CONSISTENCY_GRID = 50


@dataclass(frozen=True)
class SchedulerSpec:
    """One sampler: `settings` go to `from_config`; `prediction_types` are those diffusers implements for it."""

    name: str
    class_name: str
    summary: str
    recommended_steps: int
    aliases: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    stochastic: bool = False
    prediction_types: tuple[str, ...] = PREDICTION_TYPES
    spacing: str = "trailing"  # default timestep spacing below T steps: start at t = T-1
    # Inpainting's resampling redoes a step from freshly noised input: fine for schedulers whose history
    # is x0 predictions, wrong for those that extrapolate past epsilons (LMS, PLMS) or split a step (Heun).
    resamples: bool = True
    # Consistency samplers (LCM, TCD) step on a fixed grid of this many of the training timesteps (at most T),
    # the solver grid a consistency-distilled model learned: --steps picks among them, --timestep-spacing is not used.
    grid: int | None = None
    ignores_clip_sample: bool = False  # takes clip_sample and thresholding but applies neither (TCD): the loop clips

    @property
    def scheduler_class(self) -> type:
        return _MENDED.get(self.class_name) or getattr(diffusers, self.class_name)


class FiniteDDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIM, but finite with eta = 1 from a zero-terminal-SNR start (diffusers issue 5969).

    There alpha_bar_t = 0 makes the variance exactly 1 - alpha_bar_prev, all that `step` can take away:
    its square root, squared, can round above that, and the root of the negative rest is NaN, so every
    image came out black. One part in a million less leaves the step as it was; elsewhere it is diffusers'.
    """

    def _get_variance(self, timestep, prev_timestep):
        variance = super()._get_variance(timestep, prev_timestep)
        return variance * (1 - 2**-20) if self.alphas_cumprod[timestep] == 0 else variance


# Our own subclass where diffusers' class fails on models difftool trains; listed under diffusers' name.
_MENDED = {"DDIMScheduler": FiniteDDIMScheduler}


SCHEDULERS = [
    SchedulerSpec("ddpm", "DDPMScheduler", "ancestral DDPM (Ho et al. 2020)", 1000, stochastic=True),
    SchedulerSpec("ddim", "DDIMScheduler", "DDIM (Song et al. 2021); deterministic unless --eta > 0", 50),
    SchedulerSpec("dpm-solver", "DPMSolverMultistepScheduler", "DPM-Solver++ 2M multistep", 20,
                  aliases=("dpmpp-2m", "dpm++"), settings={"algorithm_type": "dpmsolver++", "solver_order": 2}),
    SchedulerSpec("dpm-solver-sde", "DPMSolverMultistepScheduler", "SDE DPM-Solver++ 2M", 25,
                  aliases=("dpmpp-2m-sde",), settings={"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                  stochastic=True),
    # lower_order_final: diffusers forces it on (with a warning at every set_timesteps) for a zero final sigma.
    SchedulerSpec("dpm-solver-single", "DPMSolverSinglestepScheduler", "DPM-Solver++ 2S singlestep", 20,
                  settings={"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC multistep predictor-corrector", 20),
    # DEIS stops at the last timestep's noise level (it has no final zero sigma): "linspace" makes that
    # t = 0, where "trailing" would leave the noise of t = T/steps - 1 in the images.
    SchedulerSpec("deis", "DEISMultistepScheduler", "DEIS multistep", 20, spacing="linspace"),
    SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler (Karras et al. 2022)", 30),
    SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", "Euler ancestral", 30, aliases=("euler_a",),
                  stochastic=True, prediction_types=("epsilon", "v_prediction")),
    # Heun and PLMS average model outputs across a step; across the first step from t = T-1 (sigma in the
    # hundreds for cosine schedules) that average is far off and the images come out as noise, so they
    # start one step below T-1 ("leading").
    SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun 2nd order (two model calls per step)", 25, spacing="leading",
                  resamples=False),
    # PNDM combines the raw outputs of past steps before converting v to epsilon, so v-prediction
    # models come out wrong (0.02 off on a model that knows the answer): epsilon only.
    # PNDM's Runge-Kutta warm-up needs at least 4 steps (fewer crash in diffusers) and costs 9 extra
    # model calls; its pseudo linear multistep part alone (PLMS) works at any step count.
    SchedulerSpec("pndm", "PNDMScheduler", "PNDM, linear multistep part (PLMS)", 50, aliases=("plms",),
                  settings={"skip_prk_steps": True, "set_alpha_to_one": True}, prediction_types=("epsilon",),
                  spacing="leading", resamples=False),
    SchedulerSpec("lms", "LMSDiscreteScheduler", "linear multistep, order 4 (k-diffusion LMS)", 50, resamples=False),
    # Multistep consistency sampling: each step predicts x0 and noises it afresh to the next grid timestep, the
    # way a consistency-distilled model is meant to be sampled in 1-8 steps (undistilled models blur).
    SchedulerSpec("lcm", "LCMScheduler", "LCM multistep consistency sampling (Luo et al. 2023), for distilled "
                  "models", 4, stochastic=True, grid=CONSISTENCY_GRID),
    # TCD's --eta (its gamma, default 0.3) keeps part of the trajectory's own noise between steps: 0 is
    # deterministic, 1 as LCM.
    SchedulerSpec("tcd", "TCDScheduler", "TCD strategic stochastic sampling (Zheng et al. 2024), for distilled "
                  "models", 4, stochastic=True, grid=CONSISTENCY_GRID, ignores_clip_sample=True),
]
_BY_NAME = {alias: spec for spec in SCHEDULERS for alias in (spec.name, *spec.aliases)}

# EDM-style schedulers give the model c_in-scaled inputs and a function of sigma (log(sigma)/4, or
# 2 atan(sigma)/pi) as its "timestep": a DDPM-trained UNet, conditioned on 0..T-1, has seen neither.
_EDM_NAMES = ("edm", "edm-euler", "edm-dpm-solver", "edm-dpmsolver", "cosine-dpm-solver", "cosine-dpmsolver")


def get_spec(name: str) -> SchedulerSpec:
    key = name.lower()
    if key in _EDM_NAMES:
        raise UserError(
            f"'{name}' is an EDM-preconditioned scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler, "
            "CosineDPMSolverMultistepScheduler): it feeds the model a function of sigma as timestep and EDM-scaled "
            "inputs, which a DDPM-trained model never saw; for Karras-style steps use "
            "`--scheduler euler --karras-sigmas` or `--scheduler dpm-solver --karras-sigmas`")
    spec = _BY_NAME.get(key)
    if spec is None:
        raise UserError(f"unknown scheduler '{name}'{did_you_mean(name, list(_BY_NAME))} (difftool schedulers lists them)")
    return spec


def choose(name: str | None, steps: int | None, defaults, total: int) -> tuple[SchedulerSpec, int]:
    """The sampler and step count for a request: as asked, else the recipe's `sample` settings
    (`defaults`, a SampleConfig or None), else ddim and the scheduler's recommended steps (at most T)."""
    spec = get_spec(name if name is not None else (defaults.scheduler if defaults else "ddim"))
    if steps is None:
        steps = defaults.steps if defaults and name is None else min(spec.recommended_steps, total)
    return spec, steps


def check_section_sampler(section: str, name: str, steps: int | None, total: int, eta: float | None = None) -> None:
    """A recipe section's sampler (`sample`, `eval`), refused in one line when the run starts rather than when it
    first samples: an unknown name, steps past the training timesteps, an eta its scheduler has no use for."""
    spec, steps = choose(name, steps, None, total)  # an unknown name is refused here
    if not 1 <= steps <= total:
        raise UserError(f"{section}.steps must lie between 1 and {total} (the training timesteps), got {steps}")
    if eta is not None and not takes_eta(spec):
        able = ", ".join(s.name for s in SCHEDULERS if takes_eta(s))
        raise UserError(f"{section}.eta applies to {able} only, not {section}.scheduler={spec.name}: drop "
                        f"{section}.eta or sample with one of those")


def _accepts(spec: SchedulerSpec, option: str) -> bool:
    return option in inspect.signature(spec.scheduler_class.__init__).parameters


def supports_karras(spec: SchedulerSpec) -> bool:
    return _accepts(spec, "use_karras_sigmas")


def takes_eta(spec: SchedulerSpec) -> bool:
    """Whether the scheduler's step has a noise amount (`--eta`, `sample.eta`)."""
    return "eta" in inspect.signature(spec.scheduler_class.step).parameters


def make_scheduler(name: str, training_config: dict, *, steps: int, karras_sigmas: bool = False,
                   eta: float | None = None, timestep_spacing: str | None = None):
    """A sampler for a model trained with `training_config` (a DDPMScheduler config dict).

    `eta` is only validated here; callers pass it to `denoise`. Raises UserError for any option
    the scheduler cannot honour.
    """
    spec = get_spec(name)
    base = diffusers.DDPMScheduler.from_config(training_config)
    _check_options(spec, base.config, steps=steps, karras_sigmas=karras_sigmas, eta=eta,
                   timestep_spacing=timestep_spacing)
    # The training betas, not the schedule's name: most samplers refuse to build "sigmoid" or "laplace"
    # schedules that DDPMScheduler trains with, and this way the betas match training exactly.
    settings = dict(spec.settings, trained_betas=_sampling_betas(spec, base))
    if spec.grid:
        settings["original_inference_steps"] = _grid(spec, base.config)
    if _accepts(spec, "timestep_spacing"):
        # "leading" never starts a short schedule at t = T-1, where training put pure noise. At steps == T
        # every spacing means all timesteps, yet DPM-Solver, UniPC and DEIS crash on leading/linspace there.
        full = steps == base.config.num_train_timesteps
        settings["timestep_spacing"] = "trailing" if full else timestep_spacing or spec.spacing
    if karras_sigmas:
        settings["use_karras_sigmas"] = True
    clip = base.config.clip_sample and base.config.clip_sample_range == 1.0
    if clip and _accepts(spec, "thresholding") and not _accepts(spec, "clip_sample") and not spec.ignores_clip_sample:
        # With sample_max_value 1, thresholding clamps the predicted x0 to [-1, 1]: DDPM's clip_sample.
        settings.update(thresholding=True, sample_max_value=1.0)
    # Only what the sampler takes: LCM and TCD list no compatible classes, so diffusers warns of every other key.
    own = {k: v for k, v in base.config.items() if _accepts(spec, k) or k.startswith("_")}
    scheduler = spec.scheduler_class.from_config(own, **settings)
    if clip and (spec.ignores_clip_sample or not (_accepts(spec, "thresholding") or _accepts(spec, "clip_sample"))):
        # Euler, Euler-a, LMS, PNDM and TCD do not clip: the loop clamps the model's x0 for them (clip_denoised).
        scheduler.register_to_config(clip_denoised=True)
    return scheduler


# Where a scheduler cannot take a last timestep of exactly zero signal, it gets this instead: the value
# diffusers itself substitutes in the schedulers that accept `rescale_betas_zero_snr` (fp16's smallest subnormal).
_ZERO_SNR_FLOOR = 2.0**-24


def _sampling_betas(spec: SchedulerSpec, base) -> list[float]:
    """The training betas, with a zero-terminal-SNR end made finite for schedulers that would divide by it.

    DPM-Solver singlestep, DEIS and LMS turn alpha_bar = 0 into an infinite sigma and sample NaN; the
    schedulers that know `rescale_betas_zero_snr` handle it themselves (and re-derive the same betas).
    """
    betas = base.betas.clone().double()
    if base.config.get("rescale_betas_zero_snr") and not _accepts(spec, "rescale_betas_zero_snr"):
        before_last = torch.cumprod(1 - betas[:-1], 0)[-1]
        betas[-1] = 1 - _ZERO_SNR_FLOOR / before_last
    return betas.tolist()


def _grid(spec: SchedulerSpec, config) -> int:
    return min(spec.grid, config.num_train_timesteps)


def _check_options(spec: SchedulerSpec, config, *, steps: int, karras_sigmas: bool, eta: float | None,
                   timestep_spacing: str | None) -> None:
    total = config.num_train_timesteps
    if not 1 <= steps <= total:
        raise UserError(f"--steps must be between 1 and {total} (the model was trained with {total} timesteps), got {steps}")
    if spec.grid and steps > _grid(spec, config):
        raise UserError(f"{spec.name} steps on a grid of {_grid(spec, config)} of the training timesteps (the "
                        f"consistency-distillation solver's): --steps at most {_grid(spec, config)}, got {steps}")
    kind = config.prediction_type
    if kind not in spec.prediction_types:
        able = ", ".join(s.name for s in SCHEDULERS if kind in s.prediction_types)
        raise UserError(f"{spec.name} cannot sample a model trained with prediction_type '{kind}' "
                        f"({spec.class_name} does not implement it); use one of: {able}")
    if karras_sigmas and not supports_karras(spec):
        able = ", ".join(s.name for s in SCHEDULERS if supports_karras(s))
        raise UserError(f"--karras-sigmas does not apply to {spec.name}; schedulers that support it: {able}")
    if eta is not None:
        if not takes_eta(spec):
            raise UserError(f"--eta applies to {', '.join(s.name for s in SCHEDULERS if takes_eta(s))} only")
        if not math.isfinite(eta):
            raise UserError(f"--eta must be a finite number, got {eta}")
        if not 0 <= eta <= 1:
            # Above 1 the noise added exceeds the step's whole variance: diffusers samples NaN (black images).
            raise UserError(f"--eta must lie between 0 (deterministic) and 1 (as noisy as DDPM), got {eta}")
    if timestep_spacing is not None:
        if timestep_spacing not in SPACINGS:
            raise UserError(f"unknown --timestep-spacing '{timestep_spacing}'; choose one of: {', '.join(SPACINGS)}")
        if spec.grid:
            raise UserError(f"{spec.name} takes no --timestep-spacing (it steps on its grid of {_grid(spec, config)} "
                            f"timesteps, from t = T-1)")
        if not _accepts(spec, "timestep_spacing"):
            raise UserError(f"{spec.name} takes no --timestep-spacing (its schedule always starts at t = T-1)")


def model_calls(spec: SchedulerSpec, steps: int, training_config: dict | None = None) -> int:
    """Model evaluations (NFE) for `steps` steps: second-order and warm-up steps call the model twice."""
    scheduler = make_scheduler(spec.name, training_config or diffusers.DDPMScheduler().config, steps=steps)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def describe(spec: SchedulerSpec) -> dict:
    """What `difftool schedulers` shows; model calls assume a 1000-step training schedule."""
    return {
        "name": spec.name, "aliases": list(spec.aliases), "class": spec.class_name,
        "recommended_steps": spec.recommended_steps, "model_calls": model_calls(spec, spec.recommended_steps),
        "stochastic": spec.stochastic, "karras_sigmas": supports_karras(spec),
        "prediction_types": list(spec.prediction_types), "summary": spec.summary,
    }


def step_options(scheduler, *, generators: list | None, eta: float | None) -> dict:
    """Keyword arguments for `scheduler.step`: only those its signature takes.

    DDIM with clipping must also recompute epsilon from the clipped x0, as the DDIM and guided-diffusion
    samplers do; diffusers' default keeps the unclipped epsilon, which washes images out step by step.
    """
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generators} if generators is not None and "generator" in accepted else {}
    if eta is not None:
        options["eta"] = eta
    if "use_clipped_model_output" in accepted and scheduler.config.get("clip_sample"):
        options["use_clipped_model_output"] = True
    return options


def clip_denoised(scheduler, output: torch.Tensor, model_input: torch.Tensor, t) -> torch.Tensor:
    """`output` re-expressed so that the x0 it implies lies in [-1, 1] (DDPM's clip_sample).

    For schedulers without any clipping of their own. `model_input` is the scaled input the model saw,
    which is x_t of the variance-preserving process for every scheduler: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.
    Without this, a sigma-space sampler's first step from t = T-1 (sigma in the hundreds for cosine
    schedules) multiplies the model's error by sigma and the images come out as noise.
    """
    alpha_bar = alpha_bar_now(scheduler, t, output.device)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return output.clamp(-1, 1)
    x0 = (model_input - s * output) / a if kind == "epsilon" else a * model_input - s * output
    x0 = x0.clamp(-1, 1)
    eps = (model_input - a * x0) / s
    return eps if kind == "epsilon" else a * eps - s * x0


def renoise(before, after, x: torch.Tensor, t, t_next, noise: torch.Tensor) -> torch.Tensor:
    """Take a sample at the level of `t_next` back up to the level of `t`, in the scheduler's own frame.

    `before` and `after` are the scheduler just before and after the step from t to t_next. The
    levels are read off `add_noise` (x = a * x0 + s * noise: variance-preserving, or a = 1 and
    s = sigma for Euler-type schedulers), so this needs no per-scheduler formula.
    """
    a_t, s_t = _level(before, t, x)
    a_n, s_n = _level(after, t_next, x)
    ratio = a_t / a_n
    return ratio * x + (s_t**2 - ratio**2 * s_n**2).clamp(min=0).sqrt() * noise


def _level(scheduler, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(scheduler, "begin_index", 0) is None:
        scheduler.set_begin_index(0)
    unit, zero = torch.ones_like(like[:1]), torch.zeros_like(like[:1])
    timesteps = t.reshape(1) if torch.is_tensor(t) else torch.tensor([t])
    return scheduler.add_noise(unit, zero, timesteps), scheduler.add_noise(zero, unit, timesteps)


def alpha_bar_now(scheduler, t, device) -> torch.Tensor:
    """Signal fraction ab of the current step (between `scale_model_input` and `step`), read where the scheduler
    keeps it (no host sync): the scaled model input is x_t = sqrt(ab) x0 + sqrt(1 - ab) eps for every scheduler."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and getattr(scheduler, "step_index", None) is not None:
        sigma = sigmas[scheduler.step_index].to(device)
        return 1 / (1 + sigma**2)
    return scheduler.alphas_cumprod.to(device)[t]
