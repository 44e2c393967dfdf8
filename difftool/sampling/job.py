"""`difftool sample` as a library call: which images to make, who makes them, where they go.

Image i of a request comes from the generator seeded by (seed, i) and is written as
NNNNNN.png (or into samples.npz), so a request can be split over processes, interrupted and
resumed, and still yields the files one uninterrupted process would write. Work is dealt
out in whole batches, so every image is computed in the same batch whatever the number of
processes: multi-process output is bitwise that of a single process on the same hardware.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difftool.allocator import keep_freed_memory
from difftool.models.checkpoints import LoadedModel, place
from difftool.models.load import DTYPES, load_model
from difftool.compiling import check_can_compile
from difftool.safeio import refuse_file_in_the_way
from difftool.errors import UserError
from difftool.images import enlarge, make_grid, save_png
from difftool.progress import SamplingProgress, show_notes
from difftool.output_rules import UNTOUCHED, Existing, refuse_inputs_as_output, source_name
from difftool.sampling.defaults import sampling_defaults
from difftool.runlock import main_process_lock
from difftool.sampling.folder import FORMATS, SampleFolder
from difftool.sampling.record import image_metadata, model_settings
from difftool.sampling.loop import Predictor, denoise, image_generators, initial_noise, to_uint8
from difftool.sampling.settings import SamplerSettings, resolve_sampler
from difftool.sampling.trajectory import Trajectory
from difftool.threads import announce, sharing_cores

GRID_MAX = 64


@dataclass
class SampleRequest:
    """What to sample; None means "from the model's training recipe, else the scheduler's default"."""

    num_images: int = 16
    scheduler: str | None = None
    steps: int | None = None
    seed: int = 0
    batch_size: int = 64
    eta: float | None = None
    karras_sigmas: bool = False
    timestep_spacing: str | None = None
    classes: list[str] | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    weights: str | None = None
    dtype: str = "fp32"
    compile: bool = False
    format: str = "png"
    trajectory: int = 0  # > 0: also x_t and the predicted x0 of each image at this many model calls


@dataclass
class SampleResult:
    output: Path
    made: int  # images made by this call, all processes together
    total: int
    seconds: float
    grid: Path | None
    settings: dict  # the resolved scheduler, steps, guidance, ... (what sample.json holds)
    model_calls: int  # network evaluations per image (NFE): a guided step counts two


@dataclass
class _Plan:
    """A request resolved against one model: everything needed to make image i, and what is recorded of it."""

    sampler: SamplerSettings
    settings: dict  # what sample.json and every image record: the model, the sampler settings, the dtype
    label_names: list[str] | None
    model_calls: int

    def image_metadata(self, index: int) -> dict[str, str]:
        return image_metadata(self.settings, index, self.sampler.label(index), self.label_names)


@sharing_cores
def generate(source: str | Path, request: SampleRequest, output: Path | None = None, *,
             existing: Existing = UNTOUCHED, model: LoadedModel | None = None) -> SampleResult:
    """Make `request.num_images` images from the model at `source` into the folder `output`, which may hold
    images made before only as `existing` allows.

    `model` is that model already loaded (with `request.weights`), for callers that sample it more than once.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    _check_request(request, state.device)
    if model is None:
        model = load_shared(source, request.weights, state)
    plan = _plan(model, request, sampling_defaults(source, model.info))
    output = Path(output) if output else default_output(source, plan.settings)
    refuse_file_in_the_way(output)
    refuse_inputs_as_output(output, {"the model": source})
    with main_process_lock(state, output, "sample"):  # a second sample into the folder would make the same images
        return _generate_into(output, model, plan, request, state, existing)


def load_shared(source: str | Path, weights: str | None, state) -> LoadedModel:
    """Load the model in every process (a hub download happens once); the main process prints its notes."""
    with state.main_process_first():
        model = load_model(source, weights=weights)
    if state.is_main_process:
        show_notes(model.notes)
    return model


def _generate_into(output: Path, model: LoadedModel, plan: _Plan, request: SampleRequest, state,
                   existing: Existing) -> SampleResult:
    folder = SampleFolder(output, request.format)
    todo = folder.todo(request.num_images, plan.settings, existing)
    state.wait_for_everyone()
    settings_record = {**plan.settings, "num_images": request.num_images, "format": request.format}
    if state.is_main_process:
        folder.prepare(settings_record, overwrite=existing.overwrite)
    state.wait_for_everyone()

    batches = [todo[i : i + request.batch_size] for i in range(0, len(todo), request.batch_size)]
    mine = batches[state.process_index :: state.num_processes]
    keep_freed_memory()  # every model call frees and allocates its activations again
    unet = place(model.unet, state.device, DTYPES[request.dtype]).eval()
    pick_unet = _compiled_for_first_size(unet, mine) if request.compile else lambda batch: unet
    announce()
    start = time.perf_counter()
    with SamplingProgress(len(todo), enabled=state.is_main_process) as progress:
        # Rank 0's bar stands for all processes: its share of the images, scaled up to the whole.
        scale = len(todo) / max(1, sum(len(batch) for batch in mine))
        for batch in mine:
            per_step = len(batch) * scale / plan.model_calls
            traced = Trajectory(request.trajectory) if request.trajectory else None
            images = sample_batch(pick_unet(batch), model.scheduler_config, model.info, plan.sampler, batch,
                                  device=state.device, on_step=functools.partial(progress.advance, per_step),
                                  trajectory=traced)
            if traced is not None:  # before the images: a resume remakes an image, and with it its trajectory
                traced.write(folder.trajectories, batch, plan.image_metadata)
            folder.write_batch(batch, images, [plan.sampler.label(i) for i in batch], plan.image_metadata)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    grid = None
    if state.is_main_process:
        if request.format == "npz":
            folder.merge_parts(request.num_images, plan.sampler.classes is not None)
        grid = _write_grid(folder, plan, request.num_images)
    state.wait_for_everyone()
    return SampleResult(output, len(todo), request.num_images, seconds, grid, settings_record,
                        plan.sampler.network_calls(plan.model_calls))


def _compiled_for_first_size(unet, batches: list[list[int]]):
    """The UNet compiled for the size of the first batch, and eager for any other size.

    A batch of another size (the last one, or the gaps a --resume fills) would make torch.compile
    compile again, for a dynamic batch dimension: 37 s for a last batch of 8 that runs in 0.8 s
    eagerly. Those few images are made eagerly instead (within float tolerance of compiled ones).
    """
    compiled = torch.compile(unet, dynamic=False)
    size = len(batches[0]) if batches else 0
    return lambda batch: compiled if len(batch) == size else unet


# ---------------------------------------------------------------- planning


def check_request(model: LoadedModel, request: SampleRequest, source: str | Path) -> None:
    """Refuse what `generate` would refuse, without sampling: for callers with slow work to do before it."""
    _check_request(request, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    _plan(model, request, sampling_defaults(source, model.info))


def _check_request(request: SampleRequest, device: torch.device) -> None:
    if request.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {request.num_images}")
    if request.trajectory < 0:
        raise UserError(f"--trajectory must be 0 (none) or a number of steps to show, got {request.trajectory}")
    if request.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {request.batch_size}")
    if request.format not in FORMATS:
        raise UserError(f"unknown --format '{request.format}': use png or npz")
    if request.dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{request.dtype}': use fp32, bf16 or fp16")
    if request.dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; on CPU use bf16 (or fp32)")
    if request.compile:
        check_can_compile(device, "--compile")


def _plan(model: LoadedModel, request: SampleRequest, defaults) -> _Plan:
    sampler = resolve_sampler(model.info, model.scheduler_config, defaults, scheduler=request.scheduler,
                              steps=request.steps, classes=request.classes, guidance_scale=request.guidance_scale,
                              guidance_rescale=request.guidance_rescale, seed=request.seed,
                              karras_sigmas=request.karras_sigmas, eta=request.eta,
                              timestep_spacing=request.timestep_spacing)
    scheduler = sampler.make_scheduler(model.scheduler_config)
    scheduler.set_timesteps(sampler.steps)
    settings = {**model_settings(model), **sampler.record(scheduler), "dtype": request.dtype}
    return _Plan(sampler, settings, model.info.get("label_names"), len(scheduler.timesteps))


def default_output(source: str | Path, settings: dict) -> Path:
    """samples/NAME-SCHEDULER-STEPS in the working folder (NAME: `output_rules.source_name`)."""
    return Path("samples") / f"{source_name(source)}-{settings['scheduler']}-{settings['steps']}"


# ---------------------------------------------------------------- making images


def sample_batch(unet, scheduler_config: dict, info: dict, sampler: SamplerSettings, indices: list[int], *, device,
                 on_step=None, trajectory: Trajectory | None = None) -> torch.Tensor:
    """uint8 N×C×H×W images of `indices` from a model (its UNet, training scheduler config and difftool info),
    image i from the generator seeded by (seed, i); `trajectory` records what they went through on the way.

    What `difftool sample` makes of each batch and what training's preview grids are; a fresh
    scheduler each call, as multistep ones keep state.
    """
    generators = image_generators(sampler.seed, indices)
    noise = initial_noise(generators, (info["channels"], info["resolution"], info["resolution"]), device)
    labels = torch.tensor([sampler.label(i) for i in indices], device=device) if sampler.classes else None
    predict = Predictor(unet, class_labels=labels, null_class=info.get("null_class"),
                        guidance_scale=sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale)
    scheduler = sampler.make_scheduler(scheduler_config)
    if trajectory is not None:
        scheduler.set_timesteps(sampler.steps)
        predict = trajectory.watch(predict, scheduler, len(scheduler.timesteps))
    images = to_uint8(denoise(predict, scheduler, noise, steps=sampler.steps, generators=generators, eta=sampler.eta,
                              on_step=on_step))
    if trajectory is not None:
        trajectory.finish(images)
    return images


def grid_of(tiles: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """A grid of uint8 N×C×H×W tiles, enlarged (nearest-neighbour) to at least 64 px: smaller is too small to judge.

    Tiles that cycle through `classes` classes get a multiple of that many columns, so each column holds one
    class, as near a square as that allows (2 classes: not 2 columns of 32 rows).
    """
    ncol = classes * max(1, round(math.sqrt(len(tiles)) / classes)) if classes else None
    return make_grid(enlarge(tiles, max(1, 64 // tiles.shape[-1])), ncol=ncol)


def _write_grid(folder: SampleFolder, plan: _Plan, num_images: int) -> Path:
    """grid.png of the first images, tiles enlarged to 64 px; one column per class when cycling classes."""
    classes = plan.sampler.classes
    grid = grid_of(folder.first_images(min(num_images, GRID_MAX)),
                   len(classes) if classes and 1 < len(classes) <= 16 else None)
    save_png(grid, folder.grid, {k: str(v) for k, v in plan.settings.items()})
    return folder.grid
