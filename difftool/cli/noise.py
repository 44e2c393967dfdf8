"""`difftool noise`: flags -> difftool.sampling.forward.forward_strip."""

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

Examples:

  difftool noise photo.png --model runs/photos                       # 6 evenly spaced timesteps, photo-noise.png

  difftool noise photo.png --model runs/photos --timesteps 0,50,100,250,500,999 --output forward.png
"""


@user_errors
@registered_early
def noise(
    image: Annotated[Path, typer.Argument(help="Image file (read as training reads images: shorter side to the model's size, centre square).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Whose training schedule noises the image: run folder, checkpoint, pipeline or unet/ folder, .safetensors file, or hub id.")],
    points: Annotated[int, typer.Option(help="Timesteps to show, evenly spaced from 0 to T-1.")] = 6,
    timesteps: Annotated[str | None, typer.Option(help="The timesteps to show instead, comma-separated (e.g. 0,250,999).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=options.SEED_MAX, help="The noise (one draw for every timestep).")] = 0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .png. Default: IMAGE-noise.png in the working folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the output file if it exists.")] = False,
) -> None:
    """The forward process on your own image: x_t at chosen timesteps of a model's training schedule, as a strip."""
    locate(model)  # a mistyped path is refused before the model stack is imported
    from difftool.sampling.forward import forward_strip

    made = forward_strip(model, image, output, timesteps=timesteps, points=points, seed=seed, overwrite=overwrite)
    say(f"[green]done[/]: {made.output} (timesteps {', '.join(map(str, made.timesteps))}; signal fraction "
        f"{made.alpha_bars[0]:.3g} to {made.alpha_bars[-1]:.3g})")


noise.__doc__ = (noise.__doc__ or "") + EXAMPLES
