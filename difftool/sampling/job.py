"""`difftool sample` as a library call: which images to make, who makes them, where they go.

Image i of a request comes from the generator seeded by (seed, i) and is written as
NNNNNN.png (or into samples.npz), so a request can be split over processes, interrupted and
resumed, and still yields the files one uninterrupted process would write. Work is dealt
out in whole batches, so every image is computed in the same batch whatever the number of
processes: multi-process output is bitwise that of a single process on the same hardware.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difftool.allocator import keep_freed_memory
from difftool.models.checkpoints import LoadedModel, place
from difftool.models.load import DTYPES, load_model
from difftool.compiling import check_can_compile
from difftool.safeio import TMP_PREFIX, atomic_path, make_folder, refuse_file_in_the_way, write_text
from difftool.sampling.conditions import (
    resolve_classes,
    resolve_guidance,
    resolve_guidance_rescale,
)
from difftool.errors import UserError
from difftool.images import enlarge, make_grid, read_image, save_png
from difftool.progress import SamplingProgress, show_notes
from difftool.output_rules import refuse_inputs_as_output, refuse_overwrite_with_resume, source_name
from difftool.sampling.defaults import sampling_defaults
from difftool.runlock import main_process_lock
from difftool.sampling.record import image_metadata, model_settings
from difftool.sampling.loop import denoise, image_generators, initial_noise, to_uint8
from difftool.sampling.schedulers import choose, make_scheduler
from difftool.threads import announce, sharing_cores

SETTINGS_FILE = "sample.json"
NPZ_FILE = "samples.npz"
PARTS_DIR = ".parts"
GRID_FILE = "grid.png"
GRID_MAX = 64
FORMATS = ("png", "npz")
# Settings that may differ between a run and its --resume: they do not change any image.
RESUMABLE = {"model", "num_images", "difftool_version"}
# Settings added after 0.1.0, with the value that folders written without them were made with.
ADDED_SETTINGS = {"guidance_rescale": 0.0}


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


@dataclass
class SampleResult:
    output: Path
    made: int  # images made by this call, all processes together
    total: int
    seconds: float
    grid: Path | None
    settings: dict  # the resolved scheduler, steps, guidance, ... (what sample.json holds)
    model_calls: int  # per image (NFE)


@dataclass
class _Plan:
    """A request resolved against one model: everything needed to make image i."""

    settings: dict
    class_ids: list[int] | None
    label_names: list[str] | None
    null_class: int | None
    guidance_scale: float
    guidance_rescale: float
    shape: tuple[int, int, int]
    model_calls: int

    def label(self, index: int) -> int | None:
        return self.class_ids[index % len(self.class_ids)] if self.class_ids else None

    def image_metadata(self, index: int) -> dict[str, str]:
        return image_metadata(self.settings, index, self.label(index), self.label_names)


@sharing_cores
def generate(source: str | Path, request: SampleRequest, output: Path | None = None, *, overwrite: bool = False,
             resume: bool = False, show_progress: bool = True, model: LoadedModel | None = None) -> SampleResult:
    """Make `request.num_images` images from the model at `source` into the folder `output`.

    `model` is that model already loaded (with `request.weights`), for callers that sample it more than once.
    """
    from accelerate import PartialState

    refuse_overwrite_with_resume(overwrite, resume)
    state = PartialState(cpu=not torch.cuda.is_available())
    _check_request(request, state.device)
    if model is None:
        model = load_shared(source, request.weights, state)
    plan = _plan(model, request, sampling_defaults(source, model.info))
    output = Path(output) if output else default_output(source, plan.settings)
    refuse_file_in_the_way(output)
    refuse_inputs_as_output(output, {"the model": source})
    with main_process_lock(state, output, "sample"):  # a second sample into the folder would make the same images
        return _generate_into(output, model, plan, request, state, overwrite=overwrite, resume=resume,
                              show_progress=show_progress)


def load_shared(source: str | Path, weights: str | None, state) -> LoadedModel:
    """Load the model in every process (a hub download happens once); the main process prints its notes."""
    with state.main_process_first():
        model = load_model(source, weights=weights)
    if state.is_main_process:
        show_notes(model.notes)
    return model


def _generate_into(output: Path, model: LoadedModel, plan: _Plan, request: SampleRequest, state, *, overwrite: bool,
                   resume: bool, show_progress: bool) -> SampleResult:
    todo = _todo(output, plan, request, overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
    settings_record = {**plan.settings, "num_images": request.num_images, "format": request.format}
    if state.is_main_process:
        _prepare_output(output, request.format, overwrite=overwrite)
        # Written first, so that an interrupted request can be resumed and checked against it.
        write_text(output / SETTINGS_FILE, json.dumps(settings_record, indent=2) + "\n")
    state.wait_for_everyone()

    batches = [todo[i : i + request.batch_size] for i in range(0, len(todo), request.batch_size)]
    mine = batches[state.process_index :: state.num_processes]
    keep_freed_memory()  # every model call frees and allocates its activations again
    unet = place(model.unet, state.device, DTYPES[request.dtype]).eval()
    pick_unet = _compiled_for_first_size(unet, mine) if request.compile else lambda batch: unet
    announce()
    start = time.perf_counter()
    with SamplingProgress(len(todo), enabled=show_progress and state.is_main_process) as progress:
        # Rank 0's bar stands for all processes: its share of the images, scaled up to the whole.
        scale = len(todo) / max(1, sum(len(batch) for batch in mine))
        for batch in mine:
            per_step = len(batch) * scale / plan.model_calls
            images = _make_batch(pick_unet(batch), model, plan, request, batch, state.device,
                                 on_step=functools.partial(progress.advance, per_step))
            _write_batch(output, plan, request.format, batch, images)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    grid = None
    if state.is_main_process:
        if request.format == "npz":
            _merge_parts(output, request.num_images, plan.class_ids is not None)
        grid = _write_grid(output, request.format, plan, request.num_images)
    state.wait_for_everyone()
    return SampleResult(output, len(todo), request.num_images, seconds, grid, settings_record, plan.model_calls)


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
    info = model.info
    spec, steps = choose(request.scheduler, request.steps, defaults, model.scheduler_config["num_train_timesteps"])
    scheduler = make_scheduler(spec.name, model.scheduler_config, steps=steps, karras_sigmas=request.karras_sigmas,
                               eta=request.eta, timestep_spacing=request.timestep_spacing)
    scheduler.set_timesteps(steps)
    class_ids = resolve_classes(request.classes, info)
    guidance = resolve_guidance(request.guidance_scale, defaults.guidance_scale if defaults else None, info, class_ids)
    rescale = resolve_guidance_rescale(request.guidance_rescale, getattr(defaults, "guidance_rescale", None), guidance)
    settings = {
        **model_settings(model),
        "scheduler": spec.name,
        "steps": steps,
        "eta": request.eta,
        "karras_sigmas": request.karras_sigmas,
        "timestep_spacing": scheduler.config.get("timestep_spacing"),
        "seed": request.seed,
        "classes": class_ids,
        "guidance_scale": guidance,
        "guidance_rescale": rescale,
        "dtype": request.dtype,
    }
    return _Plan(settings, class_ids, info.get("label_names"), info.get("null_class"), guidance, rescale,
                 (info["channels"], info["resolution"], info["resolution"]), len(scheduler.timesteps))


def default_output(source: str | Path, settings: dict) -> Path:
    """samples/NAME-SCHEDULER-STEPS in the working folder (NAME: `output_rules.source_name`)."""
    return Path("samples") / f"{source_name(source)}-{settings['scheduler']}-{settings['steps']}"


# ---------------------------------------------------------------- the output folder


def _image_files(output: Path) -> dict[int, Path]:
    """NNNNNN.png files by index (complete files only: partial writes have temporary names)."""
    return {int(p.stem): p for p in output.glob("*.png") if re.fullmatch(r"\d{6,}", p.stem)}


def _existing(output: Path, fmt: str) -> set[int]:
    """Indices already written."""
    if fmt == "png":
        return set(_image_files(output))
    found: set[int] = set()
    if (output / NPZ_FILE).is_file():
        with np.load(output / NPZ_FILE) as npz:
            found |= set(range(len(npz["arr_0"])))
    for part in (output / PARTS_DIR).glob("part-*.npz"):
        with np.load(part) as npz:
            found |= {int(i) for i in npz["indices"]}
    return found


def _todo(output: Path, plan: _Plan, request: SampleRequest, *, overwrite: bool, resume: bool) -> list[int]:
    """Indices still to make; refuses to touch images made before unless told how."""
    wanted = range(request.num_images)
    if overwrite or not output.exists():
        return list(wanted)
    previous_file = output / SETTINGS_FILE
    done = _existing(output, request.format)
    clash = previous_file.is_file() or bool(done & set(wanted))
    if clash and not resume:
        raise UserError(f"{output} already holds samples; add --resume to make only the missing images with the "
                        f"same settings, --overwrite to replace them, or choose another --output")
    if not clash:
        return list(wanted)
    if not previous_file.is_file():
        raise UserError(f"cannot resume in {output}: it has images but no {SETTINGS_FILE} to check their settings; "
                        f"use --overwrite or another --output")
    previous = json.loads(previous_file.read_text())
    current = {**plan.settings, "format": request.format}
    differ = sorted(k for k in current.keys() - RESUMABLE if previous.get(k, ADDED_SETTINGS.get(k)) != current[k])
    if differ:
        changes = ", ".join(f"{k} {previous.get(k)!r} -> {current[k]!r}" for k in differ)
        raise UserError(f"cannot resume in {output}: its images were made with other settings ({changes}); "
                        f"use --overwrite or another --output")
    return [i for i in wanted if i not in done]


def _prepare_output(output: Path, fmt: str, *, overwrite: bool) -> None:
    """Create the folder; drop what an interrupted write left, and with --overwrite the old samples."""
    make_folder(output)
    doomed = list(output.glob(f"{TMP_PREFIX}*"))
    if overwrite:
        doomed += list(_image_files(output).values())
        doomed += [output / name for name in (NPZ_FILE, GRID_FILE, SETTINGS_FILE)]
        shutil.rmtree(output / PARTS_DIR, ignore_errors=True)
    for path in doomed:
        path.unlink(missing_ok=True)
    if fmt == "npz":
        make_folder(output / PARTS_DIR)


# ---------------------------------------------------------------- making and writing images


def _make_batch(unet, model: LoadedModel, plan: _Plan, request: SampleRequest, batch: list[int], device,
                on_step) -> torch.Tensor:
    """uint8 N×C×H×W images for the given indices, with the plan's settings."""
    settings = plan.settings
    labels = torch.tensor([plan.label(i) for i in batch], device=device) if plan.class_ids else None
    return sample_batch(unet, model.scheduler_config, batch, plan.shape, device, scheduler=settings["scheduler"],
                        steps=settings["steps"], seed=request.seed, labels=labels, null_class=plan.null_class,
                        guidance_scale=plan.guidance_scale, guidance_rescale=plan.guidance_rescale,
                        karras_sigmas=request.karras_sigmas, eta=request.eta, timestep_spacing=request.timestep_spacing,
                        on_step=on_step)


def sample_batch(unet, scheduler_config: dict, indices: list[int], shape: tuple[int, int, int], device, *,
                 scheduler: str, steps: int, seed: int, labels: torch.Tensor | None = None, null_class: int | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, karras_sigmas: bool = False,
                 eta: float | None = None, timestep_spacing: str | None = None, on_step=None) -> torch.Tensor:
    """uint8 N×C×H×W images of `indices`, image i from the generator seeded by (seed, i).

    What `difftool sample` makes of each batch and what training's preview grids are; a fresh
    scheduler each call, as multistep ones keep state.
    """
    sampler = make_scheduler(scheduler, scheduler_config, steps=steps, karras_sigmas=karras_sigmas, eta=eta,
                             timestep_spacing=timestep_spacing)
    generators = image_generators(seed, indices)
    noise = initial_noise(generators, shape, device)
    x = denoise(unet, sampler, noise, steps=steps, generators=generators, class_labels=labels, null_class=null_class,
                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, on_step=on_step)
    return to_uint8(x)


def grid_of(tiles: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """A grid of uint8 N×C×H×W tiles, enlarged (nearest-neighbour) to at least 64 px: smaller is too small to judge.

    Tiles that cycle through `classes` classes get a multiple of that many columns, so each column holds one
    class, as near a square as that allows (2 classes: not 2 columns of 32 rows).
    """
    ncol = classes * max(1, round(math.sqrt(len(tiles)) / classes)) if classes else None
    return make_grid(enlarge(tiles, max(1, 64 // tiles.shape[-1])), ncol=ncol)


def _write_batch(output: Path, plan: _Plan, fmt: str, batch: list[int], images: torch.Tensor) -> None:
    if fmt == "png":
        for index, image in zip(batch, images, strict=True):
            save_png(image, output / f"{index:06d}.png", plan.image_metadata(index))
        return
    labels = np.array([plan.label(i) for i in batch]) if plan.class_ids else np.zeros(0)
    with atomic_path(output / PARTS_DIR / f"part-{batch[0]:06d}.npz") as tmp, tmp.open("wb") as f:
        np.savez(f, indices=np.array(batch), images=images.permute(0, 2, 3, 1).numpy(), labels=labels)


def _merge_parts(output: Path, num_images: int, labelled: bool) -> None:
    """samples.npz: arr_0 = uint8 N×H×W×C in index order (what FID tools read), arr_1 = class ids."""
    images: dict[int, np.ndarray] = {}
    labels: dict[int, int] = {}
    if (output / NPZ_FILE).is_file():
        with np.load(output / NPZ_FILE) as npz:
            images.update(enumerate(npz["arr_0"]))
            if "arr_1" in npz:
                labels.update(enumerate(npz["arr_1"].tolist()))
    parts = sorted((output / PARTS_DIR).glob("part-*.npz"))
    for part in parts:
        with np.load(part) as npz:
            images.update(zip(npz["indices"].tolist(), npz["images"], strict=True))
            labels.update(zip(npz["indices"].tolist(), npz["labels"].tolist(), strict=False))
    missing = [i for i in range(num_images) if i not in images]
    if missing:
        raise UserError(f"{len(missing)} images are missing from {output} (first: {missing[0]}); run again with --resume")
    arrays = {"arr_0": np.stack([images[i] for i in range(num_images)])}
    if labelled:
        arrays["arr_1"] = np.array([labels[i] for i in range(num_images)])
    with atomic_path(output / NPZ_FILE) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)


def _write_grid(output: Path, fmt: str, plan: _Plan, num_images: int) -> Path:
    """grid.png of the first images, tiles enlarged to 64 px; one column per class when cycling classes."""
    n = min(num_images, GRID_MAX)
    if fmt == "png":
        tiles = torch.stack([torch.from_numpy(np.array(read_image(output / f"{i:06d}.png")[0])) for i in range(n)])
        tiles = tiles.unsqueeze(-1) if tiles.ndim == 3 else tiles
    else:
        with np.load(output / NPZ_FILE) as npz:
            tiles = torch.from_numpy(npz["arr_0"][:n])
    tiles = tiles.permute(0, 3, 1, 2)
    grid = grid_of(tiles, len(plan.class_ids) if plan.class_ids and 1 < len(plan.class_ids) <= 16 else None)
    path = output / GRID_FILE
    save_png(grid, path, {k: str(v) for k, v in plan.settings.items()})
    return path
