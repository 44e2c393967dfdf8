"""The one denoising loop, shared by training previews, `difftool sample`, `inpaint` and `img2img`.

It is written against the scheduler interface rather than a pipeline so that any scheduler
of the registry works: noise scaled by `init_noise_sigma`, inputs by `scale_model_input`,
second-order schedulers simply see repeated timesteps, and `generator` goes only to the
schedulers whose `step` takes one. Image i of a request depends only on (seed, i).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from difftool.errors import UserError
from difftool.sampling.schedulers import clip_denoised, renoise, step_options
from difftool.threads import rebalance


class NonFiniteSamples(UserError):
    """Samples with NaN or inf in them: cast to uint8 they would be saved as black images without a word."""

    def __init__(self, broken: int, total: int):
        self.broken, self.total = broken, total
        super().__init__(
            f"{broken} of {total} images came out NaN or infinite, so none of this batch was written: the model's "
            "weights may have diverged (see the run's loss), or this sampler fails on it; try another --scheduler")


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded from (seed, index), so batching never changes an image."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]).to(device)


class Predictor:
    """One model evaluation per call, in float32, with classifier-free guidance batched.

    With guidance, the conditional and the unconditional (null class) halves run as one batch.
    `guidance_rescale` (phi, Lin et al. 2024) pulls the guided output's per-image standard deviation
    back towards the conditional one's: strong guidance otherwise over-saturates and over-exposes.
    """

    def __init__(self, unet, *, class_labels: torch.Tensor | None = None, null_class: int | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        self.unet, self.dtype = unet, unet.dtype
        self.guided = class_labels is not None and guidance_scale != 1.0
        if self.guided and null_class is None:
            raise ValueError("classifier-free guidance needs the null class id")
        self.labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)]) if self.guided else class_labels
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale

    def __call__(self, model_in: torch.Tensor, t) -> torch.Tensor:
        batch = torch.cat([model_in, model_in]) if self.guided else model_in
        if self.guided and torch.is_tensor(t) and t.ndim:  # a timestep per image (distillation's)
            t = torch.cat([t, t])
        out = self.unet(batch.to(self.dtype), t, class_labels=self.labels).sample.to(model_in.dtype)
        if self.guided:
            cond, uncond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
            if self.guidance_rescale:
                dims = tuple(range(1, out.ndim))
                rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                out = self.guidance_rescale * rescaled + (1 - self.guidance_rescale) * out
        return out


def predicted_x0_and_noise(output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor,
                           kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise a model output stands for at x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return (x - b * output) / a, output
    if kind == "v_prediction":
        return a * x - b * output, b * x + a * output
    return output, (x - a * output) / b


@torch.inference_mode()
def denoise(
    predict: Callable[[torch.Tensor, object], torch.Tensor],
    scheduler,
    noise: torch.Tensor,
    *,
    steps: int,
    generators: list[torch.Generator] | None = None,
    eta: float | None = None,
    on_step: Callable[[], None] | None = None,
    known=None,
) -> torch.Tensor:
    """Run the reverse process from `noise` with the model `predict` (a `Predictor`: classes and guidance
    included); returns samples in model space (about [-1, 1]).

    The sample stays in the dtype of `noise` (float32) whatever the model's dtype, so
    half-precision models lose no accuracy in the scheduler's arithmetic. `eta` goes to
    schedulers that take it (DDIM). `known` (inpainting's `KnownRegion`): before each model call,
    `known.replace(scheduler, x, t)` puts back the known region noised to t, and `known.resample`
    rounds then redo each step (but the last) from the result noised back to t, the scheduler's state
    restored, so the known and generated regions can agree.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    return denoise_from(predict, scheduler, noise * scheduler.init_noise_sigma, 0, generators=generators, eta=eta,
                        on_step=on_step, known=known)


@torch.inference_mode()
def denoise_from(
    predict: Callable[[torch.Tensor, object], torch.Tensor],
    scheduler,
    x: torch.Tensor,
    start: int,
    *,
    generators: list[torch.Generator] | None = None,
    eta: float | None = None,
    on_step: Callable[[], None] | None = None,
    known=None,
) -> torch.Tensor:
    """Run the timesteps of `scheduler`, already set (`set_timesteps`), from index `start` on, from the sample `x`
    at that level; the rest as `denoise`, which is this from index 0 and pure noise.

    Image to image (SDEdit) starts part-way down with its image noised to the level of `timesteps[start]`; a
    scheduler that steps by index must then have been told where it begins (`set_begin_index(start)`).
    No timestep left (`start` at or past the end): `x` comes back as it is, with no model call.
    """
    options = step_options(scheduler, generators=generators, eta=eta)
    clip = scheduler.config.get("clip_denoised", False)
    timesteps = scheduler.timesteps
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        rounds = (known.resample if known is not None else 0) + 1 if i + 1 < len(timesteps) else 1
        for round_ in range(rounds):
            if known is not None:
                x = known.replace(scheduler, x, t)
            before = copy.deepcopy(scheduler) if round_ + 1 < rounds else None
            rebalance()
            model_in = scheduler.scale_model_input(x, t)
            out = predict(model_in, t)
            if clip:
                out = clip_denoised(scheduler, out, model_in, t)
            x = scheduler.step(out, t, x, **options).prev_sample
            if on_step is not None:
                on_step()
            if before is not None:
                noise = initial_noise(generators, x.shape[1:], x.device) if generators else torch.randn_like(x)
                x = renoise(before, scheduler, x, t, timesteps[i + 1], noise)
                scheduler = before
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space samples in [-1, 1] -> uint8 NCHW on the CPU; NaN or inf raises NonFiniteSamples."""
    broken = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if broken:
        raise NonFiniteSamples(broken, len(x))
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
