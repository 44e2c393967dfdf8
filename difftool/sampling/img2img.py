"""`difftool img2img` as a library call: SDEdit (Meng et al. 2022), sampling that starts from the user's image.

The image is noised to the level of t ≈ strength × T and denoised from there with any scheduler of the registry,
so the result keeps the image's layout and colours and takes its detail from the model. Strength means what it
means in diffusers' img2img pipelines: of N steps, the last int(N × strength) are run. At strength 1 the whole
schedule runs from pure noise, exactly as `sample` does (the image is not used); at strength 0 nothing runs and
the image comes back as the model sees it.

One image or the images of a folder; sample k of every image comes from the generator seeded by (seed, k), as in
`inpaint`. Every output name is decided, and checked against files already there, before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difftool.data.decode import training_view
from difftool.errors import UserError
from difftool.images import images_by_stem, printable, read_image, save_png, why_unreadable
from difftool.models.checkpoints import LoadedModel
from difftool.output_rules import UNTOUCHED, Existing, numbered, refuse_inputs_as_output, result_paths
from difftool.progress import SamplingProgress, show_notes
from difftool.runlock import main_process_lock
from difftool.safeio import refuse_file_in_the_way
from difftool.sampling.job import load_shared
from difftool.sampling.loop import Predictor, denoise_from, image_generators, initial_noise, to_uint8
from difftool.sampling.record import image_metadata, model_settings
from difftool.sampling.settings import SamplerChoice, SamplerSettings
from difftool.threads import announce, sharing_cores

DEFAULT_FOLDER = "img2img"
# What may differ between the images of one output folder and a --resume: they do not change the rest.
RESUMABLE = {"model", "difftool_version", "index", "image", "class", "class_id"}


@dataclass
class Img2ImgRequest(SamplerChoice):
    """What to make: the sampler as asked (SamplerChoice), how far to go back, how many of each image."""

    strength: float = 0.5
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 64
    weights: str | None = None


@dataclass
class Img2ImgResult:
    outputs: list[Path]  # written by this call
    kept: int  # outputs --resume found made before and left alone
    seconds: float
    model_calls: int  # per sample (NFE)
    settings: dict


@dataclass
class _Job:
    """One input image and the files its samples go to (sample k to outputs[k])."""

    image: Path
    outputs: list[Path]


# ---------------------------------------------------------------- the maths


def start_index(scheduler, steps: int, strength: float) -> int:
    """The index of the first of the scheduler's timesteps (set for `steps`) that image to image runs.

    As diffusers' img2img pipelines: int(steps × strength) steps of denoising, so the first t_start = steps - that
    steps are skipped, t_start × order timesteps (a second-order scheduler lists each step twice). No step to run
    (strength 0, or a strength too small for the step count): the end of the timesteps.
    """
    init = min(int(steps * strength), steps)
    return len(scheduler.timesteps) if init == 0 else (steps - init) * scheduler.order


def start_sample(scheduler, x0: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
    """What the reverse process starts from at index `start` of the scheduler's timesteps (set already): `x0`
    noised to that level with `noise`, as diffusers does it (`add_noise`, the scheduler told where it begins).

    From index 0 that is `noise` alone, scaled as `denoise` scales it, so a full-strength run is plain sampling bit
    for bit; past the end it is `x0` itself.
    """
    if start == 0:
        return noise * scheduler.init_noise_sigma
    if start >= len(scheduler.timesteps):
        return x0.clone()
    if hasattr(scheduler, "set_begin_index"):  # sigma schedulers find their step by index, not by timestep
        scheduler.set_begin_index(start)
    return scheduler.add_noise(x0, noise, scheduler.timesteps[start : start + 1])


# ---------------------------------------------------------------- the job


@sharing_cores
def img2img_files(model_source: str | Path, image: Path, output: Path | None, request: Img2ImgRequest, *,
                  existing: Existing = UNTOUCHED) -> Img2ImgResult:
    """Make `request.num_samples` samples of the image at `image` (or of each image in that folder) with the model at
    `model_source`; returns the files written. Outputs made before are refused, replaced or kept as `existing` says."""
    _check_request(request)
    image = Path(image)
    jobs = _plan_jobs(image, output, request.num_samples)
    folder = jobs[0].outputs[0].parent if image.is_dir() else None
    inputs = {"the image folder" if folder else "the image": image, "the model": model_source}
    for path in [folder] if folder else [p for job in jobs for p in job.outputs]:  # in a folder, its files are too
        refuse_inputs_as_output(path, inputs)
    refuse_file_in_the_way(folder or jobs[0].outputs[0].parent)
    if folder is None and jobs[0].outputs[0].is_dir():
        raise UserError(f"{printable(jobs[0].outputs[0])} is a folder; give --output a .png file name or a folder")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    # A folder of images: one img2img at a time in the output folder, as for `sample` and `inpaint`.
    with main_process_lock(state, folder, DEFAULT_FOLDER) if folder else contextlib.nullcontext():
        if not (existing.overwrite or existing.resume):
            _refuse_existing(jobs)
        state.wait_for_everyone()  # every process has looked before any writes
        return _run(model_source, jobs, request, existing, state)


@dataclass
class _Plan:
    """The request resolved against the model: the sampler, where it starts, what every image records."""

    model: LoadedModel
    sampler: SamplerSettings
    strength: float
    settings: dict
    model_calls: int

    def metadata(self, index: int, image: Path) -> dict[str, str]:
        return image_metadata(self.settings, index, self.sampler.label(index), self.model.info.get("label_names"),
                              image=printable(image.name))


def _plan(model: LoadedModel, model_source: str | Path, request: Img2ImgRequest) -> _Plan:
    sampler = request.resolve(model, model_source, seed=request.seed)
    sampler = request.unconditional_unless_asked(sampler, model.info, "image to image")
    scheduler = sampler.make_scheduler(model.scheduler_config)
    scheduler.set_timesteps(sampler.steps)
    start = start_index(scheduler, sampler.steps, request.strength)
    first = f"{float(scheduler.timesteps[start]):g}" if start < len(scheduler.timesteps) else "none"
    settings = {**model_settings(model), **sampler.record(scheduler), "strength": request.strength,
                "start_timestep": first}
    return _Plan(model, sampler, request.strength, settings, len(scheduler.timesteps) - start)


def _run(model_source: str | Path, jobs: list[_Job], request: Img2ImgRequest, existing: Existing,
         state) -> Img2ImgResult:
    """The batches of every image, dealt out whole to the processes of `state` (so every sample is computed in the
    batch one process would compute it in); the result lists what all of them wrote."""
    model = load_shared(model_source, request.weights, state)
    plan = _plan(model, model_source, request)
    if existing.resume:
        _check_resumable(jobs, plan)
    todo = [(job, [k for k, out in enumerate(job.outputs) if existing.overwrite or not out.is_file()]) for job in jobs]
    batches = [(job, indices[i : i + request.batch_size]) for job, indices in todo
               for i in range(0, len(indices), request.batch_size)]
    resolution, channels = model.info["resolution"], model.info["channels"]
    views = {job.image: training_view(job.image, resolution, channels) for job, _ in batches}  # all read before work
    state.wait_for_everyone()  # every process has checked the resume before any writes
    if state.is_main_process:
        show_notes(_notes(plan, request))
    unet = model.unet.to(state.device).eval()
    announce()
    mine = batches[state.process_index :: state.num_processes]
    start, total = time.perf_counter(), sum(len(batch) for _, batch in batches)
    with SamplingProgress(total, enabled=state.is_main_process, label="img2img") as progress:
        scale = total / max(1, sum(len(batch) for _, batch in mine))  # rank 0's bar stands for all processes
        for job, batch in mine:
            calls = plan.model_calls
            on_step = functools.partial(progress.advance, len(batch) * scale / calls) if calls else None
            images = _make(plan, unet, views[job.image], batch, state.device, on_step)
            if not calls:
                progress.advance(len(batch) * scale)
            for index, picture in zip(batch, images, strict=True):
                save_png(picture, job.outputs[index], plan.metadata(index, job.image))
    state.wait_for_everyone()
    written = [job.outputs[index] for job, batch in batches for index in batch]
    kept = sum(len(job.outputs) for job in jobs) - len(written)
    return Img2ImgResult(written, kept, time.perf_counter() - start, plan.sampler.network_calls(plan.model_calls),
                         plan.settings)


def _make(plan: _Plan, unet, view: torch.Tensor, indices: list[int], device, on_step) -> torch.Tensor:
    """uint8 samples `indices` of one image (uint8 C×H×W at the model's resolution)."""
    sampler, info = plan.sampler, plan.model.info
    generators = image_generators(sampler.seed, indices)
    noise = initial_noise(generators, tuple(view.shape), device)
    x0 = view.to(device).float().div(127.5).sub(1).expand(len(indices), *view.shape)
    labels = torch.tensor([sampler.label(i) for i in indices], device=device) if sampler.classes else None
    predict = Predictor(unet, class_labels=labels, null_class=info.get("null_class"),
                        guidance_scale=sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale)
    scheduler = sampler.make_scheduler(plan.model.scheduler_config)  # a fresh one: multistep ones keep state
    scheduler.set_timesteps(sampler.steps, device=device)
    start = start_index(scheduler, sampler.steps, plan.strength)
    x = start_sample(scheduler, x0, noise, start)
    return to_uint8(denoise_from(predict, scheduler, x, start, generators=generators, eta=sampler.eta,
                                 on_step=on_step))


def _notes(plan: _Plan, request: Img2ImgRequest) -> list[str]:
    steps, strength = plan.sampler.steps, request.strength
    if plan.model_calls == 0 and strength > 0:
        note = (f"--strength {strength} of {steps} steps leaves no step to run (int({steps} × {strength}) = 0): "
                "the images come back as the model sees them; raise --strength or --steps")
        return [note]
    if min(int(steps * strength), steps) == steps:
        return ["at --strength 1 the image is not used: the whole schedule runs from pure noise, as difftool sample"]
    return []


# ---------------------------------------------------------------- requests and outputs


def _check_request(request: Img2ImgRequest) -> None:
    if not 0 <= request.strength <= 1:  # NaN too
        raise UserError(f"--strength must lie in [0, 1] (0: the image as it is, 1: plain sampling), "
                        f"got {request.strength}")
    for flag, value in (("--num-samples", request.num_samples), ("--batch-size", request.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")


def _plan_jobs(image: Path, output: Path | None, n: int) -> list[_Job]:
    """The input images and the output file of each sample."""
    if not image.exists():
        raise UserError(f"{printable(image)} does not exist; give an image file or a folder of images")
    if image.is_dir():
        folder = output or Path(DEFAULT_FOLDER)
        if folder.suffix.lower() == ".png":
            raise UserError(f"with a folder of images, --output is a folder, not {printable(folder)}")
        return [_Job(path, numbered(folder / f"{path.stem}.png", n)) for path in images_by_stem(image).values()]
    if not image.is_file():  # a FIFO would be waited on for ever
        raise UserError(f"{printable(image)} is not a regular file; give an image file or a folder of images")
    return [_Job(image, result_paths(image, output, f"{image.stem}-img2img.png", n))]


def _refuse_existing(jobs: list[_Job]) -> None:
    taken = [p for job in jobs for p in job.outputs if p.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        resume = " (--resume to make only the missing ones)" if len(jobs) > 1 or len(jobs[0].outputs) > 1 else ""
        raise UserError(f"{printable(taken[0])}{more} already exist; pass --overwrite to replace them{resume} or "
                        "choose another --output")


def _check_resumable(jobs: list[_Job], plan: _Plan) -> None:
    """--resume keeps what was made before only if it was made with these settings (read from the first one's PNG)."""
    made = next((p for job in jobs for p in job.outputs if p.is_file()), None)
    if made is None:
        return
    try:
        recorded = read_image(made)[0].info
    except Exception as err:  # noqa: BLE001 - whatever stands there, it is not an output to keep
        raise UserError(f"cannot resume: {printable(made)} is not readable ({why_unreadable(err, made)}); use "
                        "--overwrite or another --output") from err
    wanted = plan.metadata(0, made)
    differ = sorted(k for k in wanted.keys() - RESUMABLE if recorded.get(k) != wanted[k])
    if differ:
        changes = ", ".join(f"{k} {recorded.get(k)!r} -> {wanted[k]!r}" for k in differ)
        raise UserError(f"cannot resume: {printable(made)} was made with other settings ({changes}); use "
                        "--overwrite or another --output")
