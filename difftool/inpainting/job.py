"""`difftool inpaint` as a library call: image and mask files in, filled images out.

One image with one mask, or two folders of them matched by name. Sample k of an image comes
from the generator seeded by (seed, k), as in `sample`. Every output name is decided, and
checked against files already there, before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difftool.models.checkpoints import LoadedModel
from difftool.models.load import load_model
from difftool.sampling.conditions import resolve_classes, resolve_guidance
from difftool.errors import UserError
from difftool.images import first_frame_note, save_png
from difftool.inpainting.repaint import METHODS, KnownRegion, RepaintSchedule, blend, repaint
from difftool.inpainting.pairs import Pair, find_pairs, load_pair
from difftool.inpainting.paste import comparison, paste_back
from difftool.progress import SamplingProgress, show_notes
from difftool.output_rules import numbered, refuse_inputs_as_output, result_paths
from difftool.sampling.defaults import sampling_defaults
from difftool.runlock import run_lock
from difftool.sampling.record import image_metadata, model_settings
from difftool.sampling.loop import Predictor, image_generators, initial_noise, to_uint8
from difftool.sampling.schedulers import SCHEDULERS, choose, make_scheduler
from difftool.threads import announce, sharing_cores

REPAINT_STEPS = 250  # the RePaint paper's setting


@dataclass
class InpaintRequest:
    method: str = "repaint"
    scheduler: str | None = None  # blend only; default: the recipe's sampler, else ddim
    steps: int | None = None
    jump_length: int = 10
    jump_n_sample: int = 10
    resample: int = 0  # blend only
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16
    classes: list[str] | None = None
    guidance_scale: float | None = None
    weights: str | None = None
    invert: bool = False
    grow: int = 0
    crop: bool = False
    comparison: bool = False


@dataclass
class InpaintResult:
    outputs: list[Path]
    comparisons: list[Path]
    seconds: float


@dataclass
class _Job:
    """One image + mask and the files its samples go to."""

    image: Path
    mask: Path
    outputs: list[Path]

    def comparison_path(self, output: Path) -> Path:
        return output.with_name(f"{output.stem}-comparison.png")


@sharing_cores
def inpaint_files(model_source: str | Path, images: Path, masks: Path, output: Path | None, request: InpaintRequest,
                  *, overwrite: bool = False) -> InpaintResult:
    """Fill the white region of each mask in its image; returns the files written."""
    _check_request(request)
    images, masks = Path(images), Path(masks)
    jobs = _plan_jobs(images, masks, output, request)
    folder = jobs[0].outputs[0].parent if images.is_dir() else None
    inputs = {"the image folder" if folder else "the image": images, "the mask folder" if folder else "the mask": masks,
              "the model": model_source}
    for path in [folder] if folder else _all_outputs(jobs, request.comparison):  # in a folder, its files are too
        refuse_inputs_as_output(path, inputs)
    # Folders of images: one inpaint at a time in the output folder, as for `sample`.
    with run_lock(folder, "inpaint") if folder else contextlib.nullcontext():
        if not overwrite:
            _refuse_existing(jobs, request.comparison)
        return _inpaint_jobs(model_source, jobs, request)


def _inpaint_jobs(model_source: str | Path, jobs: list[_Job], request: InpaintRequest) -> InpaintResult:
    model = load_model(model_source, weights=request.weights)
    show_notes(model.notes)
    defaults = sampling_defaults(model_source, model.info)
    method = _Method(model, request, defaults)
    class_ids = method.class_ids
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = model.unet.to(device).eval()
    announce()
    settings = {
        **model_settings(model), "method": request.method, **method.settings, "seed": request.seed,
        "guidance_scale": method.guidance, "invert": request.invert, "grow": request.grow, "crop": request.crop,
    }
    # Every file is checked before anything is written.
    several_frames = [name for job in jobs for name in _load(job, model, request).several_frames]
    if several_frames:
        show_notes([first_frame_note(several_frames)])
    written, compared, shown = [], [], set()
    start = time.perf_counter()
    total = len(jobs) * request.num_samples
    with SamplingProgress(total, label="inpaint") as progress:
        for job in jobs:
            pair = _load(job, model, request)
            notes = list(pair.notes)
            if pair.coverage == 0:
                notes.append(f"the mask {job.mask} is all black: nothing to generate, the image is copied")
            elif pair.coverage == 1:
                notes.append(f"the mask {job.mask} covers the whole image: that is plain sampling (difftool sample)")
            show_notes(note for note in notes if note not in shown)
            shown.update(notes)
            for first in range(0, request.num_samples, request.batch_size):
                indices = list(range(first, min(first + request.batch_size, request.num_samples)))
                on_step = functools.partial(progress.advance, len(indices) / method.model_calls)
                results = _fill(pair, unet, method, indices, device, on_step)
                for index, result in zip(indices, results, strict=True):
                    filled = paste_back(pair, result) if pair.coverage > 0 else pair.original
                    label = class_ids[index % len(class_ids)] if class_ids else None
                    meta = image_metadata(settings, index, label, model.info.get("label_names"),
                                          image=job.image.name, mask=job.mask.name)
                    save_png(filled, job.outputs[index], meta)
                    written.append(job.outputs[index])
                    if request.comparison:
                        save_png(comparison(pair, filled), job.comparison_path(job.outputs[index]))
                        compared.append(job.comparison_path(job.outputs[index]))
    return InpaintResult(written, compared, time.perf_counter() - start)


class _Method:
    """The chosen method with its scheduler and step count, classes and guidance, resolved against the model."""

    def __init__(self, model: LoadedModel, request: InpaintRequest, defaults):
        self.model, self.request = model, request
        self.class_ids, self.guidance = _conditioning(request, model.info, defaults)
        total = model.scheduler_config["num_train_timesteps"]
        if request.method == "repaint":
            if request.scheduler is not None or request.resample:
                raise UserError("--scheduler and --resample apply to --method blend; RePaint uses DDPM steps and "
                                "--jump-length / --jump-n-sample of its own")
            self.steps = request.steps if request.steps is not None else min(REPAINT_STEPS, total)
            if not 1 <= self.steps <= total:
                raise UserError(f"--steps must be between 1 and {total} (the model was trained with {total} timesteps), "
                                f"got {self.steps}")
            self.schedule = RepaintSchedule(self.steps, request.jump_length, request.jump_n_sample)
            self.model_calls = self.schedule.model_calls()
            self.settings = {"steps": self.steps, "jump_length": request.jump_length,
                             "jump_n_sample": request.jump_n_sample}
        else:
            spec, steps = choose(request.scheduler, request.steps, defaults, total)
            if request.resample and not spec.resamples:
                able = ", ".join(s.name for s in SCHEDULERS if s.resamples)
                raise UserError(f"--resample does not work with {spec.name}, whose steps build on past noise "
                                f"estimates; use one of: {able}")
            self.name, self.steps = spec.name, steps
            scheduler = make_scheduler(spec.name, model.scheduler_config, steps=steps)
            scheduler.set_timesteps(steps)
            self.model_calls = len(scheduler.timesteps) * (1 + request.resample) - request.resample
            self.settings = {"scheduler": spec.name, "steps": steps, "resample": request.resample}

    def scheduler(self):
        from diffusers import DDPMScheduler

        if self.request.method == "repaint":
            return DDPMScheduler.from_config(self.model.scheduler_config)
        return make_scheduler(self.name, self.model.scheduler_config, steps=self.steps)


def _conditioning(request: InpaintRequest, info: dict, defaults) -> tuple[list[int] | None, float]:
    """Class ids to cycle through and the guidance scale.

    Unlike `sample`, a class-conditional model fills in without a class unless `--class` is
    given: its null class, which label dropout trained, lets the image itself decide.
    """
    null_class = info.get("null_class")
    if not request.classes and info.get("num_classes") and null_class is not None:
        if request.guidance_scale not in (None, 1.0):
            raise UserError("--guidance-scale needs --class when inpainting (without a class the model fills in "
                            "unconditionally)")
        return [null_class], 1.0
    class_ids = resolve_classes(request.classes, info)
    default = defaults.guidance_scale if defaults else None
    return class_ids, resolve_guidance(request.guidance_scale, default, info, class_ids)


def _load(job: _Job, model: LoadedModel, request: InpaintRequest) -> Pair:
    return load_pair(job.image, job.mask, resolution=model.info["resolution"], channels=model.info["channels"],
                     crop=request.crop, invert=request.invert, grow=request.grow)


def _fill(pair: Pair, unet, method: _Method, indices: list[int], device, on_step) -> torch.Tensor:
    """uint8 results (model resolution) for the given sample indices of one image."""
    n = len(indices)
    generators = image_generators(method.request.seed, indices)
    noise = initial_noise(generators, tuple(pair.image.shape), device)
    known = pair.image.to(device).expand(n, -1, -1, -1)
    mask = pair.mask.to(device).expand(n, -1, -1, -1)
    if pair.coverage == 0:  # nothing to generate: the caller keeps the original
        return to_uint8(known)
    class_ids = method.class_ids
    labels = torch.tensor([class_ids[i % len(class_ids)] for i in indices], device=device) if class_ids else None
    predict = Predictor(unet, class_labels=labels, null_class=method.model.info.get("null_class"),
                        guidance_scale=method.guidance)
    if method.request.method == "repaint":
        x = repaint(predict, method.scheduler(), known, mask, noise, schedule=method.schedule, generators=generators,
                    on_step=on_step)
    else:
        x = blend(predict, method.scheduler(), KnownRegion(known, mask, generators, method.request.resample), noise,
                  steps=method.steps, on_step=on_step)
    return to_uint8(x)


def _check_request(request: InpaintRequest) -> None:
    if request.method not in METHODS:
        raise UserError(f"unknown --method '{request.method}': use {' or '.join(METHODS)}")
    if request.resample < 0:
        raise UserError(f"--resample must be 0 or more rounds, got {request.resample}")
    for flag, value in (("--num-samples", request.num_samples), ("--batch-size", request.batch_size),
                        ("--jump-length", request.jump_length), ("--jump-n-sample", request.jump_n_sample)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if request.grow < 0:
        raise UserError(f"--grow must be 0 or more pixels, got {request.grow}")


def _plan_jobs(images: Path, masks: Path, output: Path | None, request: InpaintRequest) -> list[_Job]:
    """Which image goes with which mask, and the output file of each sample."""
    for path in (images, masks):
        if not path.exists():
            raise UserError(f"{path} does not exist")
    n = request.num_samples
    if images.is_dir():
        if not masks.is_dir():
            raise UserError(f"{images} is a folder, so the masks must be a folder too (files matched by name), "
                            f"not {masks}")
        folder = output or Path("inpainted")
        if folder.suffix.lower() == ".png":
            raise UserError(f"with folders of images, --output is a folder, not {folder}")
        return [_Job(image, mask, numbered(folder / f"{image.stem}.png", n)) for image, mask in find_pairs(images, masks)]
    if masks.is_dir():
        raise UserError(f"{masks} is a folder but {images} is one image; give one mask file")
    return [_Job(images, masks, result_paths(images, output, f"{images.stem}-inpainted.png", n))]


def _all_outputs(jobs: list[_Job], comparisons: bool) -> list[Path]:
    return [p for job in jobs for out in job.outputs
            for p in ([out, job.comparison_path(out)] if comparisons else [out])]


def _refuse_existing(jobs: list[_Job], comparisons: bool) -> None:
    taken = [p for p in _all_outputs(jobs, comparisons) if p.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise UserError(f"{taken[0]}{more} already exist; pass --overwrite to replace them or choose another --output")
