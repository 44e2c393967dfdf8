"""Options shared by several commands, declared once."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from difftool.config_rules import SEED_MAX
from difftool.progress import quieted

# Checked at parse time, as EDM does: past these bounds a request fails, or runs out of memory, only later.
IMAGES_MAX = 10_000_000  # image indices are listed before the first is made; FID papers use 50,000

Recipe = Annotated[str | None, typer.Option("--recipe", "-r", help="Built-in recipe name or a recipe YAML file (difftool recipes list). Default: chosen from --dataset, else quickstart.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override any config field: --set train.batch_size=64 (repeatable).")]
Dataset = Annotated[str | None, typer.Option("--dataset", "-d", help="shapes (built-in, offline), a hub data set (cifar10, mnist, ..., or any name), or a local image folder.")]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Run folder. Default: runs/RECIPE-DATASET.")]
Seed = Annotated[int | None, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed (default from the recipe).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
NumProcesses = Annotated[int, typer.Option(min=1, help="Run under `accelerate launch` with this many processes (GPUs).")]
MainProcessPort = Annotated[int | None, typer.Option(help="Port for the process group (with --num-processes).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def holds_quiet(command):
    """Wrap a command that takes `quiet` (--quiet): the progress module holds it while the command runs, so the bars
    deep below need no flag passed down. Held by the call, not by the parse: a parse that fails leaves nothing."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with quieted(bool(kwargs.get("quiet"))):
            return command(*args, **kwargs)

    return wrapper
GuidanceRescale = Annotated[float | None, typer.Option(
    help="Pull strong guidance's contrast back towards the conditional prediction's: 0 off, 0.7 as Lin et al. "
         "suggest (with --guidance-scale). Default: the recipe's, else 0.")]
Eta = Annotated[float | None, typer.Option(
    help="DDIM noise: 0 deterministic, 1 like DDPM (ddim); for tcd its gamma (0 deterministic, default 0.3). "
         "Default: the recipe's sample.eta, else none.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet: about 10% faster per image after tens of seconds of compiling (pays off for hundreds of images; on CPU needs g++ or clang++).")]
# The feature network and reference options of `evaluate` and `stats`.
Features = Annotated[str, typer.Option(help="inception (FID), dinov2 (FD_DINOv2), dinov2:MODEL, or a TorchScript file: uint8 N×3×H×W -> features [, probs].")]
InceptionWeights = Annotated[Path | None, typer.Option(help="The Inception TorchScript file (inception-2015-12-05.pt). Default: torch's hub cache, downloaded once.")]
FeatureBatchSize = Annotated[int, typer.Option(min=1, help="Images per feature-extractor call.")]
Split = Annotated[str, typer.Option(help="Split of a data set of real images.")]
ReferenceImages = Annotated[int | None, typer.Option(min=2, help="Use at most this many real images (all by default).")]
FRAMES_MAX = 1000  # frames of one interpolation: each is a full sampling run, and all go into one animation
