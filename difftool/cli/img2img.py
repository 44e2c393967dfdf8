"""`difftool img2img`: flags -> difftool.sampling.img2img.img2img_files."""

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

--strength S: the image is noised to about t = S·T and the last int(steps × S) steps are run; 0 gives the image
back, 1 is plain sampling (the image is not used).

Examples:

  difftool img2img photo.png --model runs/photos --strength 0.5                 # photo-img2img.png

  difftool img2img photo.png --model runs/photos --strength 0.3 -n 8 --scheduler dpm-solver --steps 20 -o variants/

  difftool img2img photos/ --model runs/photos --strength 0.6 --output img2img/
"""


@user_errors
@options.holds_quiet
@registered_early
def img2img(
    image: Annotated[Path, typer.Argument(help="Image file, or a folder of images (read as training reads images: shorter side to the model's size, centre square).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Run folder, checkpoint, pipeline or unet/ folder, .safetensors file, or hub id.")],
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="How much to change: 0 keeps the image, 1 ignores it (plain sampling).")] = 0.5,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .png (one image) or folder. Default: IMAGE-img2img.png, or img2img/ for folders.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Sampler (difftool schedulers lists them). Default: the run's recipe, else ddim.")] = None,
    steps: Annotated[int | None, typer.Option(help="Steps of the whole schedule, of which the last int(steps × strength) run. Default: the recipe's, else the scheduler's recommended count.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", max=options.IMAGES_MAX, help="Samples per image, from seeds (seed, 0..N-1): NAME-k.png.")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=options.SEED_MAX, help="Sample k of every image comes from (seed, k).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples of one image per model call.")] = 64,
    eta: Annotated[float | None, typer.Option(help="DDIM noise: 0 deterministic, 1 like DDPM (ddim and tcd only).")] = None,
    karras_sigmas: Annotated[bool, typer.Option("--karras-sigmas", help="Karras et al. step sizes (schedulers that support them).")] = False,
    timestep_spacing: Annotated[str | None, typer.Option(help="leading, trailing or linspace. Default: trailing below T steps.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Class name or id (repeatable; cycled over the samples). Default: none (the null class): the image decides, as in inpaint.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance (with --class). Default: the recipe's, else 1.")] = None,
    guidance_rescale: options.GuidanceRescale = None,
    weights: Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the model has it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace output files that exist.")] = False,
    resume: Annotated[bool, typer.Option(help="Make only the outputs missing (same settings); keep those there.")] = False,
    num_processes: options.NumProcesses = 1,
    main_process_port: options.MainProcessPort = None,
    quiet: options.Quiet = False,
) -> None:
    """Image to image (SDEdit): noise your image part of the way and let the model denoise it back."""
    locate(model)  # a mistyped path is refused before the model stack is imported
    from difftool.output_rules import Existing
    from difftool.sampling.img2img import Img2ImgRequest, img2img_files

    if num_processes > 1:
        raise typer.Exit(launch("difftool.img2img", worker_arguments(), num_processes=num_processes,
                                main_process_port=main_process_port, stopped_code=INTERRUPTED_EXIT))
    existing = Existing(overwrite, resume)
    request = Img2ImgRequest(
        strength=strength, scheduler=scheduler, steps=steps, num_samples=num_samples, seed=seed, batch_size=batch_size,
        classes=classes, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
        karras_sigmas=karras_sigmas, timestep_spacing=timestep_spacing, weights=weights,
    )
    result = img2img_files(model, image, output, request, existing=existing)
    if not rank_zero():  # the main process speaks for all
        return
    kept = f"; {result.kept} kept from before" if result.kept else ""
    if not result.outputs:
        say(f"[green]done[/]: nothing to make{kept}")
        return
    first = result.outputs[0]
    more = f" (+{len(result.outputs) - 1} more)" if len(result.outputs) > 1 else ""
    say(f"[green]done[/]: {first}{more} in {result.seconds:.1f} s, {result.model_calls} model calls each{kept}")


img2img.__doc__ = (img2img.__doc__ or "") + EXAMPLES
