"""`difftool sample`: flags -> difftool.sampling.job.generate (or accelerate launch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftool.cli import options
from difftool.cli.errors import INTERRUPTED_EXIT, rank_zero, user_errors
from difftool.cli.launch import launch, worker_arguments
from difftool.models.sources import locate
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Examples:

  difftool sample runs/quickstart-shapes                     # the recipe's sampler, 16 images + grid.png

  difftool sample runs/photos --scheduler dpm-solver --steps 20 --num-images 64 --output out/

  difftool sample runs/shapes --class circle --guidance-scale 3

  difftool sample runs/cifar --num-images 50000 --format npz --num-processes 8

  difftool sample runs/shapes -n 4 --trajectory 8                # also how each image came out of the noise
"""


@user_errors
@options.holds_quiet
@registered_early
def sample(
    model: Annotated[str, typer.Argument(help="Run folder, checkpoint, diffusers pipeline or unet/ folder, .safetensors file, or hub id.")],
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Sampler (difftool schedulers lists them). Default: the run's recipe, else ddim.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: the recipe's, else the scheduler's recommended count.")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", max=options.IMAGES_MAX, help="Images to make: indices 0..N-1.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per model call (per process).")] = 64,
    seed: Annotated[int, typer.Option(min=0, max=options.SEED_MAX, help="Image i comes from (seed, i), whatever the batch size or process count.")] = 0,
    eta: options.Eta = None,
    karras_sigmas: Annotated[bool, typer.Option("--karras-sigmas", help="Karras et al. step sizes (schedulers that support them).")] = False,
    timestep_spacing: Annotated[str | None, typer.Option(help="leading, trailing or linspace. Default: trailing below T steps.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Class name or id (repeatable; cycled over the images). Default: all classes in turn.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance (class-conditional models). Default: the recipe's, else 1.")] = None,
    guidance_rescale: options.GuidanceRescale = None,
    weights: Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the model has it.")] = None,
    dtype: Annotated[str, typer.Option(help="Model precision: fp32, bf16, or fp16 (GPU). The sampler's arithmetic stays fp32.")] = "fp32",
    compile_model: options.Compile = False,
    image_format: Annotated[str, typer.Option("--format", help="png (one file per image) or npz (samples.npz: uint8 N×H×W×C, for FID tools).")] = "png",
    trajectory: Annotated[int, typer.Option(min=0, help="Also write what each image went through: the noisy sample x_t and the predicted clean image at K evenly spaced model calls, as OUTPUT/trajectory/NNNNNN.png (a strip) and .webp (animated). No extra model calls.", metavar="K")] = 0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder. Default: samples/MODEL-SCHEDULER-STEPS.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace samples already in --output.")] = False,
    resume: Annotated[bool, typer.Option(help="Make only the images missing from --output (same settings).")] = False,
    num_processes: options.NumProcesses = 1,
    main_process_port: options.MainProcessPort = None,
    quiet: options.Quiet = False,
) -> None:
    """Sample images from a trained model with any scheduler; PNGs carry their settings."""
    locate(model)  # a mistyped path is refused before the model stack is imported
    from difftool.output_rules import Existing
    from difftool.sampling.job import SampleRequest, generate

    if num_processes > 1:
        raise typer.Exit(launch("difftool.sample", worker_arguments(), num_processes=num_processes,
                                main_process_port=main_process_port, stopped_code=INTERRUPTED_EXIT))

    request = SampleRequest(
        num_images=num_images, scheduler=scheduler, steps=steps, seed=seed, batch_size=batch_size, eta=eta,
        karras_sigmas=karras_sigmas, timestep_spacing=timestep_spacing, classes=classes, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, weights=weights, dtype=dtype, compile=compile_model, format=image_format,
        trajectory=trajectory,
    )
    try:
        result = generate(model, request, output, existing=Existing(overwrite, resume))
    except KeyboardInterrupt:
        if rank_zero():
            say("[yellow]stopped[/]: the finished images are kept; run the same command with --resume "
                "to make the rest")
        raise typer.Exit(INTERRUPTED_EXIT) from None
    if rank_zero():
        rate = f" in {result.seconds:.1f} s ({result.made / result.seconds:.2f} img/s)" if result.made else ""
        say(f"[green]done[/]: {result.made} new of {result.total} images{rate} in {result.output}"
            + (f"; grid: {result.grid}" if result.grid else ""))


sample.__doc__ = (sample.__doc__ or "") + EXAMPLES
