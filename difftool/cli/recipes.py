"""`difftool recipes list|show|cp`: the built-in training recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from difftool import config as config_mod
from difftool.cli.errors import OneLineUsageErrors, user_errors
from difftool.errors import UserError
from difftool.training.until import Plateau, until_of

app = typer.Typer(help="The built-in training recipes.", no_args_is_help=True, cls=OneLineUsageErrors)
stdout = Console()


@app.command("list")
@user_errors
def list_recipes() -> None:
    """Table of the built-in recipes: data, resolution, model size and steps.

    Example:  difftool recipes list
    """
    table = Table("recipe", "data", "px", "UNet widths", "batch", "steps", "what for")
    for name in config_mod.recipe_names():
        cfg = config_mod.load_config(name)
        table.add_row(name, cfg.data.dataset, str(cfg.data.resolution), ",".join(map(str, cfg.model.block_out_channels)),
                      str(cfg.train.batch_size), _steps(cfg), config_mod.recipe_summary(name))
    stdout.print(table)


def _steps(cfg) -> str:
    """The step budget; with train.until: plateau, the range the run may train."""
    until = until_of(cfg, cfg.train.max_steps)
    return f"{cfg.train.max_steps}-{until.limit}" if isinstance(until, Plateau) else str(cfg.train.max_steps)


@app.command("show")
@user_errors
def show(name: Annotated[str, typer.Argument(help="Recipe name (difftool recipes list).")]) -> None:
    """Print a recipe's YAML.

    Example:  difftool recipes show cifar10
    """
    stdout.print(Syntax(config_mod.recipe_text(name), "yaml", background_color="default"))


@app.command("cp")
@user_errors
def copy(
    name: Annotated[str, typer.Argument(help="Recipe name.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy (a .yaml file).")],
) -> None:
    """Copy a built-in recipe to edit; then train with --recipe DEST.

    Example:  difftool recipes cp cifar10 my.yaml && difftool train --recipe my.yaml
    """
    if dest.exists():
        raise UserError(f"{dest} already exists; choose another name or remove it first")
    from difftool.safeio import write_text

    write_text(dest, config_mod.recipe_text(name))
    typer.echo(f"wrote {dest}")
