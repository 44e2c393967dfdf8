"""`difftool inpaint`: flags -> difftool.inpainting.job.inpaint_files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftool.cli import options
from difftool.cli.errors import user_errors
from difftool.models.sources import locate
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Masks: white = generate, black = keep (--invert for the other way round).

Examples:

  difftool inpaint photo.png mask.png --model runs/photos --output filled.png --comparison

  difftool inpaint photo.png mask.png --model runs/photos --method blend --scheduler dpm-solver --steps 25 --num-samples 8

  difftool inpaint photos/ masks/ --model runs/photos --output filled/
"""


@user_errors
@options.holds_quiet
@registered_early
def inpaint(
    image: Annotated[Path, typer.Argument(help="Image file, or a folder of images.")],
    mask: Annotated[Path, typer.Argument(help="Mask file, or a folder of masks with the images' names.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Run folder, checkpoint, pipeline or unet/ folder, .safetensors file, or hub id.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .png (one image) or folder. Default: IMAGE-inpainted.png, or inpainted/ for folders.")] = None,
    method: Annotated[str, typer.Option(help="repaint (resampling, DDPM steps) or blend (any scheduler, faster).")] = "repaint",
    scheduler: Annotated[str | None, typer.Option(help="Sampler for --method blend (difftool schedulers lists them).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: 250 for repaint; the recipe's or the scheduler's for blend.")] = None,
    jump_length: Annotated[int, typer.Option(help="RePaint: levels to go back up at each resampling point.")] = 10,
    jump_n_sample: Annotated[int, typer.Option(help="RePaint: passes over each stretch (1 = no resampling).")] = 10,
    resample: Annotated[int, typer.Option(help="Blend: redo each step N more times from its result noised back up (slower, better seams).")] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", max=options.IMAGES_MAX, help="Fillings per image, from seeds (seed, 0..N-1).")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=options.SEED_MAX, help="Sample k comes from (seed, k).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples of one image per model call.")] = 16,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Class name or id for class-conditional models (repeatable).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance. Default: the recipe's, else 1.")] = None,
    weights: Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the model has it.")] = None,
    invert: Annotated[bool, typer.Option(help="Masks are black where to generate.")] = False,
    grow: Annotated[int, typer.Option(help="Widen the region to generate by N pixels (at model resolution).")] = 0,
    crop: Annotated[bool, typer.Option(help="Centre-crop to a square instead of squashing the image to the model's size.")] = False,
    with_comparison: Annotated[bool, typer.Option("--comparison", help="Also write NAME-comparison.png: input | mask | result.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace output files that exist.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Fill the masked region of an image (or a folder of images) with a trained model."""
    locate(model)  # a mistyped path is refused before the model stack is imported
    from difftool.inpainting.job import InpaintRequest, inpaint_files

    request = InpaintRequest(
        method=method, scheduler=scheduler, steps=steps, jump_length=jump_length, jump_n_sample=jump_n_sample,
        resample=resample,
        num_samples=num_samples, seed=seed, batch_size=batch_size, classes=classes, guidance_scale=guidance_scale,
        weights=weights, invert=invert, grow=grow, crop=crop, comparison=with_comparison,
    )
    result = inpaint_files(model, image, mask, output, request, overwrite=overwrite)
    first = result.outputs[0]
    more = f" (+{len(result.outputs) - 1} more)" if len(result.outputs) > 1 else ""
    say(f"[green]done[/]: {first}{more} in {result.seconds:.1f} s"
        + (f"; comparison: {result.comparisons[0]}" if result.comparisons else ""))


inpaint.__doc__ = (inpaint.__doc__ or "") + EXAMPLES
