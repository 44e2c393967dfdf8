"""`difftool interpolate` as a library call: a walk between two starting noises, each frame denoised by a
deterministic sampler, written as a captioned strip and an animation.

Seeds mode: the ends are the noise `sample` starts image 0 of seed A (and of seed B) from, so the first frame is
`difftool sample --seed A -n 1` bit for bit and the last that of seed B. Images mode: each image is taken back to
noise by DDIM inversion (diffusers' DDIMInverseScheduler, on the decoder's own timesteps in reverse) and the frames
are decoded with DDIM (eta 0); the ends then come back close to the images, not equal to them (the inversion
evaluates the model one level off at each step; the round trip is measured in the tests and the README).

The walk is spherical (slerp): Gaussian noise lives near a sphere, and a straight line between two draws passes
through noise of too small a norm, which the model denoises into a grey blur. A sampler that adds noise of its own
at each step is refused: its frames would differ by that noise, not by where they started.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from difftool.data.decode import training_view
from difftool.errors import UserError
from difftool.images import captioned_grid, enlarge, look_factor, printable, save_animation, save_png
from difftool.models.checkpoints import LoadedModel
from difftool.models.load import load_model
from difftool.output_rules import UNTOUCHED, Existing, refuse_inputs_as_output
from difftool.progress import SamplingProgress, show_notes
from difftool.safeio import refuse_file_in_the_way
from difftool.sampling.loop import Predictor, denoise, image_generators, initial_noise, to_uint8
from difftool.sampling.record import image_metadata, model_settings
from difftool.sampling.schedulers import SCHEDULERS, get_spec
from difftool.sampling.settings import SamplerChoice, SamplerSettings
from difftool.threads import announce, sharing_cores

DEFAULT_SCHEDULER = "ddim"
BATCH = 64  # middle frames per model call


@dataclass
class InterpolateRequest(SamplerChoice):
    """Two seeds or two images (exactly one of them), and the sampler as asked (SamplerChoice; its scheduler by
    default ddim, not the recipe's, which may be a stochastic one)."""

    seeds: tuple[int, int] | None = None
    images: tuple[Path, Path] | None = None
    frames: int = 8
    weights: str | None = None


@dataclass
class InterpolateResult:
    strip: Path
    animation: Path
    frames: torch.Tensor  # uint8 N×C×H×W, frame k at weight k / (N - 1)
    seconds: float
    model_calls: int  # per frame, the inversion of each image not included
    settings: dict


# ---------------------------------------------------------------- the maths


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, *, colinear: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from `a` (weight 0) to `b` (weight 1), each taken as one vector.

    The ends are `a` and `b` exactly. Between them the angle moves evenly and, for `a` and `b` of one norm, the norm
    stays that norm (a straight line would shrink it, to 1/sqrt(2) of it halfway between two independent draws).
    Nearly parallel vectors (|cos| above `colinear`) have no well-defined great circle: a straight line then.
    """
    if weight == 0:
        return a.clone()
    if weight == 1:
        return b.clone()
    va, vb = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(va, vb) / (va.norm() * vb.norm()))
    if abs(cos) > colinear:
        return torch.lerp(a, b, weight)
    theta = torch.tensor(cos).clamp(-1, 1).acos()
    ca, cb = torch.sin((1 - weight) * theta) / theta.sin(), torch.sin(weight * theta) / theta.sin()
    return (ca * va + cb * vb).reshape(a.shape).to(a.dtype)


def interpolation_weights(frames: int) -> list[float]:
    """The weight of each of `frames` frames, both ends included: 0, 1/(N-1), ..., 1."""
    return [k / (frames - 1) for k in range(frames)]


def inverse_ddim(decoder):
    """diffusers' DDIMInverseScheduler for the DDIM scheduler `decoder` (timesteps set; built from the model's
    training config, so betas, T, prediction type and clipping are training's): the same timesteps, in reverse."""
    takes = inspect.signature(diffusers.DDIMInverseScheduler.__init__).parameters
    inverse = diffusers.DDIMInverseScheduler.from_config(
        {k: v for k, v in decoder.config.items() if k in takes or k.startswith("_")})  # unknown keys: a warning each
    inverse.set_timesteps(decoder.num_inference_steps, device=decoder.timesteps.device)
    if not torch.equal(inverse.timesteps.cpu(), decoder.timesteps.cpu().flip(0)):
        raise UserError(f"DDIM inversion supports --timestep-spacing trailing or leading, not "
                        f"{decoder.config.timestep_spacing}")
    return inverse


@torch.inference_mode()
def invert(predict, decoder, x0: torch.Tensor, *, on_step=None) -> torch.Tensor:
    """The noise that DDIM (eta 0) on the timesteps of `decoder` (set already) decodes back to about `x0` (model
    space, [-1, 1]): DDIM run backwards, one model call per step. At each step the model is asked at the level being
    moved to while the sample is still one level below it (as diffusers' inversion pipelines do): the approximation
    that makes the round trip inexact, more so with fewer, larger steps."""
    inverse = inverse_ddim(decoder)
    x = x0
    for t in inverse.timesteps:
        x = inverse.step(predict(x, t), t, x).prev_sample
        if on_step is not None:
            on_step()
    return x


# ---------------------------------------------------------------- the job


@sharing_cores
def interpolate_files(model_source: str | Path, request: InterpolateRequest, output: Path | None = None, *,
                      existing: Existing = UNTOUCHED) -> InterpolateResult:
    """Write the strip (`output`, a .png) and the animation (the .webp beside it) of `request.frames` frames from the
    model at `model_source`; existing outputs are refused unless `existing.overwrite`."""
    _check_request(request)
    strip = _strip_path(request, output)
    animation = strip.with_suffix(".webp")
    inputs = {"the model": model_source}
    if request.images:
        inputs.update({"the first image": request.images[0], "the second image": request.images[1]})
    for path in (strip, animation):
        refuse_inputs_as_output(path, inputs)
        if path.is_dir():
            raise UserError(f"{printable(path)} is a folder; give --output a .png file name")
    refuse_file_in_the_way(strip.parent)
    if not existing.overwrite:
        taken = [p for p in (strip, animation) if p.exists()]
        if taken:
            raise UserError(f"{printable(taken[0])} already exists; pass --overwrite to replace it or choose another "
                            "--output")
    return _run(model_source, request, strip, animation)


def _run(model_source: str | Path, request: InterpolateRequest, strip: Path, animation: Path) -> InterpolateResult:
    model = load_model(model_source, weights=request.weights)
    show_notes(model.notes)
    sampler = _sampler(model, model_source, request)
    info = model.info
    shape = (info["channels"], info["resolution"], info["resolution"])
    views = ([training_view(path, info["resolution"], info["channels"]) for path in request.images]
             if request.images else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = model.unet.to(device).eval()
    labels = torch.tensor([sampler.label(0)], device=device) if sampler.classes else None
    predict = Predictor(unet, class_labels=labels, null_class=info.get("null_class"),
                        guidance_scale=sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale)
    decoder = sampler.make_scheduler(model.scheduler_config)
    decoder.set_timesteps(sampler.steps)
    calls = len(decoder.timesteps)
    announce()
    start = time.perf_counter()
    # The bar counts frames; the inversions' steps count as part of them (each image's as much as a frame's).
    work = (request.frames + (2 if views else 0)) * calls
    with SamplingProgress(request.frames, label="interpolate") as progress:

        def step(images: int = 1) -> None:  # one model step of `images` images
            progress.advance(images * request.frames / work)

        if views:
            ends = [_invert_image(predict, sampler, model, view.to(device), step) for view in views]
        else:
            ends = [initial_noise(image_generators(seed, [0]), shape, device) for seed in request.seeds]
        frames = _decode(predict, sampler, model.scheduler_config, ends, request.frames, step)
    settings = _settings(model, sampler, request, decoder)
    about = image_metadata(settings, 0, sampler.label(0), info.get("label_names"))
    del about["index"]
    _write(frames, strip, animation, about)
    return InterpolateResult(strip, animation, frames, time.perf_counter() - start, sampler.network_calls(calls),
                             settings)


def _invert_image(predict, sampler: SamplerSettings, model: LoadedModel, view: torch.Tensor, step) -> torch.Tensor:
    decoder = sampler.make_scheduler(model.scheduler_config)
    decoder.set_timesteps(sampler.steps, device=view.device)
    x0 = view.float().div(127.5).sub(1)[None]
    return invert(predict, decoder, x0, on_step=step)


def _decode(predict, sampler: SamplerSettings, scheduler_config: dict, ends: list[torch.Tensor], frames: int,
            step) -> torch.Tensor:
    """uint8 frames from the slerp between the two starting noises (1×C×H×W each).

    Each end is denoised alone, in a batch of one as `sample -n 1` makes it, so that it is that image bit for bit
    (another batch size may round differently); the frames between them go in batches.
    """
    noises = [slerp(ends[0], ends[1], w) for w in interpolation_weights(frames)]
    batches = [[0], *([list(range(i, min(i + BATCH, frames - 1))) for i in range(1, frames - 1, BATCH)]), [frames - 1]]
    made: dict[int, torch.Tensor] = {}
    for batch in batches:
        scheduler = sampler.make_scheduler(scheduler_config)  # a fresh one: multistep ones keep state
        noise = torch.cat([noises[k] for k in batch])
        batch_predict = _batched(predict, len(batch))
        x = denoise(batch_predict, scheduler, noise, steps=sampler.steps, eta=sampler.eta,
                    on_step=functools.partial(step, len(batch)))
        made.update(zip(batch, to_uint8(x), strict=True))
    return torch.stack([made[k] for k in range(frames)])


def _batched(predict: Predictor, size: int) -> Predictor:
    """`predict` (made for one image) for a batch of `size` images of its class."""
    if predict.labels is None or size == 1:
        return predict
    copy = Predictor.__new__(Predictor)
    copy.__dict__.update(predict.__dict__)
    halves = predict.labels.chunk(2) if predict.guided else (predict.labels,)
    copy.labels = torch.cat([h.expand(size) for h in halves])
    return copy


# ---------------------------------------------------------------- the sampler


def _sampler(model: LoadedModel, source: str | Path, request: InterpolateRequest) -> SamplerSettings:
    """ddim unless asked; one class for every frame; deterministic or refused."""
    name = request.scheduler or DEFAULT_SCHEDULER
    if request.images and get_spec(name).name != "ddim":
        raise UserError(f"interpolating between images decodes with ddim, the sampler DDIM inversion undoes, not "
                        f"{name}: leave --scheduler out or give ddim")
    if request.classes and len(request.classes) > 1:
        raise UserError(f"interpolate takes one --class (every frame is of it), got {len(request.classes)}")
    sampler = request.resolve(model, source, seed=request.seeds[0] if request.seeds else 0, scheduler=name)
    _refuse_stochastic(sampler)
    if sampler.classes:
        sampler = dataclasses.replace(sampler, classes=sampler.classes[:1])  # as sample's image 0: the first class
    if request.images:
        sampler = request.unconditional_unless_asked(sampler, model.info, "interpolating between images")
    return sampler


def _refuse_stochastic(sampler: SamplerSettings) -> None:
    spec, eta = get_spec(sampler.scheduler), sampler.eta
    if spec.name == "tcd" and (eta == 0 or sampler.steps == 1) or spec.name == "lcm" and sampler.steps == 1:
        return
    if spec.stochastic or (eta or 0) > 0:
        why = f"--eta {eta} adds noise" if (eta or 0) > 0 else f"{spec.name} adds fresh noise"
        able = ", ".join(s.name for s in SCHEDULERS if not s.stochastic)
        raise UserError(f"interpolate needs a deterministic sampler: {why} at every step, so the frames would differ "
                        f"by that noise rather than by where they start; use {able} (ddim with --eta 0)")


# ---------------------------------------------------------------- requests and outputs


def _check_request(request: InterpolateRequest) -> None:
    if request.seeds is not None and request.images is not None:
        raise UserError("give --seeds A B or two images, not both")
    if request.seeds is None and request.images is None:
        raise UserError("give --seeds A B (two seeds) or two images to interpolate between")
    given = request.seeds if request.seeds is not None else request.images
    if len(given) != 2:
        what = "seeds after --seeds" if request.seeds is not None else "images"
        raise UserError(f"interpolate takes two {what}, got {len(given)}")
    if request.frames < 2:
        raise UserError(f"--frames must be at least 2 (both ends), got {request.frames}")
    for path in request.images or ():
        if not Path(path).exists():
            raise UserError(f"{printable(path)} does not exist; give two image files")
        if not Path(path).is_file():
            raise UserError(f"{printable(path)} is not a regular file; give two image files")


def _strip_path(request: InterpolateRequest, output: Path | None) -> Path:
    if output is not None:
        if output.suffix.lower() != ".png":
            raise UserError(f"--output is the strip's .png (the .webp goes beside it), not {printable(output)}")
        return output
    ends = request.seeds if request.seeds is not None else [Path(p).stem for p in request.images]
    return Path(f"interpolate-{ends[0]}-{ends[1]}.png")


def _settings(model: LoadedModel, sampler: SamplerSettings, request: InterpolateRequest, decoder) -> dict:
    settings = {**model_settings(model), **sampler.record(decoder), "frames": request.frames,
                "interpolation_weights": [round(w, 6) for w in interpolation_weights(request.frames)]}
    del settings["seed"]
    if request.seeds is not None:
        settings["seeds"] = list(request.seeds)
    else:
        settings["images"] = [printable(Path(p).name) for p in request.images]
        settings["inversion"] = "DDIMInverseScheduler"
    return settings


def _write(frames: torch.Tensor, strip: Path, animation: Path, about: dict[str, str]) -> None:
    """The strip (the weight under each frame) and the animation (enlarged to be looked at), each with `about`."""
    captions = [f"{w:.3g}" for w in interpolation_weights(len(frames))]
    save_png(captioned_grid(frames, len(frames), captions, [""]), strip, about)
    factor = look_factor(frames.shape[-1])
    save_animation(enlarge(frames, factor), animation, {**about, "enlarged": factor})
