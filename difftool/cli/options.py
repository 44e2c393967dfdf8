"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Recipe = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Built-in recipe name or a recipe YAML file (difftool recipes list). Default: chosen from --dataset, else quickstart.")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any config field: --set train.batch_size=64 (repeatable).")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", "-d", help="shapes (built-in, offline), a hub data set (cifar10, mnist, ..., or any name), or a local image folder.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder. Default: runs/RECIPE-DATASET.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default from the recipe).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
