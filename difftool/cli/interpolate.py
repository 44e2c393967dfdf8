"""`difftool interpolate`: flags -> difftool.sampling.interpolate.interpolate_files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftool.cli import options
from difftool.cli.errors import user_errors
from difftool.config_rules import SEED_MAX
from difftool.errors import UserError
from difftool.models.sources import locate
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Every frame is denoised by a deterministic sampler (ddim by default; stochastic ones are refused): frame 0 is
`difftool sample MODEL --seed A -n 1` with the same settings, the last frame that of seed B.

Examples:

  difftool interpolate runs/quickstart-shapes --seeds 0 1 --frames 8 --class circle    # interpolate-0-1.png/.webp

  difftool interpolate runs/photos --seeds 3 7 --scheduler dpm-solver --steps 20 -o walk.png

  difftool interpolate runs/photos a.png b.png --frames 12 --steps 100        # DDIM inversion of both images
"""


@user_errors
@options.holds_quiet
@registered_early
def interpolate(
    model: Annotated[str, typer.Argument(help="Run folder, checkpoint, pipeline or unet/ folder, .safetensors file, or hub id.")],
    images: Annotated[list[Path] | None, typer.Argument(help="Two images to interpolate between (instead of --seeds), read as training reads images and DDIM-inverted to noise.", show_default=False)] = None,
    seeds: Annotated[tuple[int, int] | None, typer.Option("--seeds", min=0, max=SEED_MAX, help="Two seeds A B: the walk between the noise of image 0 of each (as difftool sample --seed).", show_default=False)] = None,
    frames: Annotated[int, typer.Option(min=2, max=options.FRAMES_MAX, help="Frames, both ends included.")] = 8,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The strip's .png (the animated .webp goes beside it). Default: interpolate-A-B.png, or interpolate-NAMEA-NAMEB.png.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="A deterministic sampler (difftool schedulers lists them; images mode: ddim only). Default: ddim.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising (and inversion) steps. Default: the scheduler's recommended count.")] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM noise: only 0 (deterministic) is accepted here.")] = None,
    karras_sigmas: Annotated[bool, typer.Option("--karras-sigmas", help="Karras et al. step sizes (schedulers that support them).")] = False,
    timestep_spacing: Annotated[str | None, typer.Option(help="leading, trailing or linspace (not with images). Default: trailing below T steps.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Class name or id of every frame. Default: seeds: class 0 (as sample's image 0); images: none (the null class), the images decide.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance (class-conditional models). Default: the recipe's, else 1.")] = None,
    guidance_rescale: options.GuidanceRescale = None,
    weights: Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the model has it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the strip and animation if they exist.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Walk between two seeds' noise (or two images' DDIM inversions): a strip and an animation of the frames."""
    if images and seeds is not None:
        if all(str(p).isdigit() for p in images):
            raise UserError(f"--seeds takes two seeds, got {2 + len(images)}")
        raise UserError("give --seeds A B or two images, not both")
    if images is not None and len(images) != 2:
        raise UserError(f"interpolate takes two images, got {len(images)}")
    locate(model)  # a mistyped path is refused before the model stack is imported
    from difftool.output_rules import Existing
    from difftool.sampling.interpolate import InterpolateRequest, interpolate_files

    request = InterpolateRequest(
        seeds=seeds, images=tuple(images) if images else None, frames=frames, scheduler=scheduler, steps=steps,
        classes=classes, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
        karras_sigmas=karras_sigmas, timestep_spacing=timestep_spacing, weights=weights,
    )
    result = interpolate_files(model, request, output, existing=Existing(overwrite=overwrite))
    say(f"[green]done[/]: {result.strip} and {result.animation}, {frames} frames in {result.seconds:.1f} s, "
        f"{result.model_calls} model calls each")


interpolate.__doc__ = (interpolate.__doc__ or "") + EXAMPLES
