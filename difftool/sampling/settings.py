"""How a set of images is sampled, resolved once into one frozen value that every sampler caller passes on.

`difftool sample`, training's preview grids, evaluation during training and inpainting all resolve their
sampler the same way: what was asked, else the model's recipe (`sampling.defaults`), else the scheduler's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from difftool.errors import UserError

from difftool.sampling.conditions import resolve_classes, resolve_guidance, resolve_guidance_rescale
from difftool.sampling.schedulers import choose, make_scheduler


@dataclass(frozen=True)
class SamplerSettings:
    """Everything but the model that decides image i: the sampler, the seed, the classes and the guidance."""

    scheduler: str
    steps: int
    seed: int = 0
    classes: tuple[int, ...] | None = None  # image i is of classes[i % len(classes)]; None: unconditional
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    karras_sigmas: bool = False
    eta: float | None = None
    timestep_spacing: str | None = None  # as asked; None: the scheduler's default

    def label(self, index: int) -> int | None:
        return self.classes[index % len(self.classes)] if self.classes else None

    def network_calls(self, predictions: int) -> int:
        """Network evaluations per image (NFE) for `predictions` denoiser calls (a scheduler's timesteps): a guided
        prediction runs the network on the conditional and the null-class half, so it counts two, as papers do."""
        return predictions * (2 if self.classes is not None and self.guidance_scale != 1.0 else 1)

    def make_scheduler(self, scheduler_config: dict):
        """A fresh scheduler (multistep ones keep state between steps) for a model trained with `scheduler_config`."""
        return make_scheduler(self.scheduler, scheduler_config, steps=self.steps, karras_sigmas=self.karras_sigmas,
                              eta=self.eta, timestep_spacing=self.timestep_spacing)

    def record(self, scheduler) -> dict:
        """What a sample folder and every image record: these settings, with the timestep spacing that `scheduler`
        (made by `make_scheduler`) uses."""
        spacing = scheduler.config.get("timestep_spacing")
        return {"scheduler": self.scheduler, "steps": self.steps, "eta": self.eta, "karras_sigmas": self.karras_sigmas,
                "timestep_spacing": spacing, "seed": self.seed,
                "classes": list(self.classes) if self.classes is not None else None,
                "guidance_scale": self.guidance_scale, "guidance_rescale": self.guidance_rescale}


def resolve_sampler(info: dict, scheduler_config: dict, defaults=None, *, scheduler: str | None = None,
                    steps: int | None = None, classes: list[str] | None = None, guidance_scale: float | None = None,
                    guidance_rescale: float | None = None, **fixed) -> SamplerSettings:
    """The settings for a model (its `info` and training scheduler config): each value as asked, else its
    `defaults` (a SampleConfig: the model's recipe), else the scheduler's own. `fixed`: seed, karras_sigmas,
    eta (else the recipe's `sample.eta` where the sampler is the recipe's), timestep_spacing, taken as they are.
    Refuses, with one line, what the model cannot do."""
    spec, steps = choose(scheduler, steps, defaults, scheduler_config["num_train_timesteps"])
    if fixed.get("eta") is None and getattr(defaults, "eta", None) is not None and \
            defaults.scheduler in (spec.name, *spec.aliases):  # the recipe's noise goes with the recipe's sampler
        fixed["eta"] = defaults.eta
    class_ids = resolve_classes(classes, info)
    guidance = resolve_guidance(guidance_scale, getattr(defaults, "guidance_scale", None), info, class_ids)
    rescale = resolve_guidance_rescale(guidance_rescale, getattr(defaults, "guidance_rescale", None), guidance)
    settings = SamplerSettings(spec.name, steps, classes=tuple(class_ids) if class_ids is not None else None,
                               guidance_scale=guidance, guidance_rescale=rescale, **fixed)
    settings.make_scheduler(scheduler_config)  # refuses options this scheduler cannot honour
    return settings


@dataclass
class SamplerChoice:
    """The sampler options a sampling command takes, as asked; None: the model's recipe, else the scheduler's
    default. The requests of `img2img` and `interpolate` extend it; `resolve` is the one way they become settings."""

    scheduler: str | None = None
    steps: int | None = None
    classes: list[str] | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    eta: float | None = None
    karras_sigmas: bool = False
    timestep_spacing: str | None = None

    def resolve(self, model, source, *, seed: int, scheduler: str | None = None) -> SamplerSettings:
        """The settings for `model` loaded from `source` (whose recipe gives the defaults); `scheduler` in place of
        the one asked, where the command has a default of its own."""
        from difftool.sampling.defaults import sampling_defaults

        return resolve_sampler(model.info, model.scheduler_config, sampling_defaults(source, model.info),
                               scheduler=scheduler or self.scheduler, steps=self.steps, classes=self.classes,
                               guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale, seed=seed,
                               karras_sigmas=self.karras_sigmas, eta=self.eta, timestep_spacing=self.timestep_spacing)

    def unconditional_unless_asked(self, sampler: SamplerSettings, info: dict, what: str) -> SamplerSettings:
        """`sampler`, except that without --class a class-conditional model redraws the user's images (`what`) as its
        null class, which label dropout trained, unguided, as `inpaint` fills in: the image decides what it becomes,
        not a class cycled over the samples. Guidance then has nothing to guide towards and is refused."""
        null_class = info.get("null_class")
        if self.classes or not info.get("num_classes") or null_class is None:
            return sampler
        if self.guidance_scale not in (None, 1.0):
            raise UserError(f"--guidance-scale needs --class for {what} (without a class the model redraws the "
                            "images unconditionally)")
        return dataclasses.replace(sampler, classes=(null_class,), guidance_scale=1.0, guidance_rescale=0.0)
