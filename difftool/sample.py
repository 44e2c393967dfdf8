"""The one denoising loop, shared by training previews and `difftool sample`.

It is written against the scheduler interface rather than a pipeline so that any scheduler
of the registry works: noise scaled by `init_noise_sigma`, inputs by `scale_model_input`,
second-order schedulers simply see repeated timesteps, and `generator` goes only to the
schedulers whose `step` takes one. Image i of a request depends only on (seed, i).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from difftool.schedulers import clip_denoised, step_options


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded from (seed, index), so batching never changes an image."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]).to(device)


@torch.inference_mode()
def denoise(
    unet,
    scheduler,
    noise: torch.Tensor,
    *,
    steps: int,
    generators: list[torch.Generator] | None = None,
    class_labels: torch.Tensor | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    eta: float | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise`; returns samples in model space (about [-1, 1]).

    Classifier-free guidance runs the conditional and the unconditional (null class) halves in
    one batched call when `guidance_scale != 1`. The sample stays in the dtype of `noise`
    (float32) whatever the model's dtype, so half-precision models lose no accuracy in the
    scheduler's arithmetic. `eta` goes to schedulers that take it (DDIM).
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    guided = class_labels is not None and guidance_scale != 1.0
    if guided:
        if null_class is None:
            raise ValueError("classifier-free guidance needs the null class id")
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)])
    else:
        labels = class_labels
    options = step_options(scheduler, generators=generators, eta=eta)
    clip = scheduler.config.get("clip_denoised", False)
    model_dtype = unet.dtype
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        batch = torch.cat([model_in, model_in]) if guided else model_in
        out = unet(batch.to(model_dtype), t, class_labels=labels).sample.to(x.dtype)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        if clip:
            out = clip_denoised(scheduler, out, model_in, t)
        x = scheduler.step(out, t, x, **options).prev_sample
        if on_step is not None:
            on_step()
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space samples in [-1, 1] -> uint8 NCHW on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


if __name__ == "__main__":  # `accelerate launch -m difftool.sample MODEL ...`
    from difftool.cli.app import run_single_command

    run_single_command("sample")
