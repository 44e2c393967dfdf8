"""`difftool convert` and `difftool inspect`: flags -> difftool.models.convert / difftool.models.describe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from difftool.cli.errors import user_errors
from difftool.models.sources import locate
from difftool.progress import say, show_notes

stdout = Console()
From = Annotated[str, typer.Option("--from", help="Source format: auto (detect), difftool (run, checkpoint, diffusers folder, single file), ddpm-original, lucidrains.")]
Weights = Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the source has both.")]


@user_errors
def convert(
    source: Annotated[str, typer.Argument(help="Run folder, checkpoint, pipeline or unet/ folder, .safetensors, .bin/.pt/.ckpt file, or hub id.")],
    target: Annotated[Path, typer.Argument(help="A folder (diffusers pipeline, or unet/ with --to unet) or a .safetensors file.")],
    source_format: From = "auto",
    to: Annotated[str | None, typer.Option(help="pipeline, unet or single. Default: single for *.safetensors, else pipeline.")] = None,
    weights: Weights = None,
    dtype: Annotated[str | None, typer.Option(help="Cast the weights: fp32, fp16 or bf16. Default: as stored.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size of a ddpm-original checkpoint (not stored in it; guessed otherwise).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a target that exists.")] = False,
) -> None:
    """Convert a checkpoint into a diffusers pipeline folder, a unet/ folder or one .safetensors file.

    Examples:

      difftool convert runs/photos/checkpoints/step-020000 out/model     # training state -> pipeline (EMA)

      difftool convert runs/photos/model model.safetensors                # folder -> one file, configs in metadata

      difftool convert model.safetensors out/model                        # and back

      difftool convert ddpm-cifar10.ckpt out/model --from ddpm-original
    """
    locate(source)  # a mistyped path is refused before the model stack is imported
    from difftool.models.convert import convert as run

    result = run(source, target, source_format=source_format, to=to, weights=weights, dtype=dtype,
                 resolution=resolution, overwrite=overwrite)
    show_notes(result.model.notes)
    say(f"[green]done[/]: {result.model.source} -> {result.target} ({result.kind})")


@user_errors
def inspect(
    source: Annotated[str, typer.Argument(help="Any model source `convert` reads.")],
    source_format: From = "auto",
    weights: Weights = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a model: architecture, parameters, dtype, weights, hash, noise schedule, size on disk.

    Examples:  difftool inspect runs/photos          difftool inspect model.safetensors --json
    """
    locate(source)  # a mistyped path is refused before the model stack is imported
    from difftool.models.describe import describe

    report = describe(source, source_format=source_format, weights=weights)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table("", "", show_header=False, box=None)
    for key, value in report.items():
        if key == "notes":
            continue
        table.add_row(key.replace("_", " "), _shown(key, value))
    stdout.print(table)
    show_notes(report["notes"])


def _shown(key: str, value) -> str:
    if key == "parameters":
        return f"{value:,}"
    if key == "size_on_disk" and value is not None:
        return f"{value / 2**20:.1f} MiB"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "-" if value is None else str(value)
