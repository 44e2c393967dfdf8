"""`difftool train`: flags -> difftool.training.plan -> difftool.training.loop.train (or accelerate launch)."""

from __future__ import annotations

from typing import Annotated

import typer

from difftool import config as config_mod
from difftool.cli import options
from difftool.cli.errors import rank_zero, user_errors
from difftool.cli.launch import launch, worker_arguments
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Examples:

  difftool train                                   # quickstart recipe on built-in shapes, offline

  difftool train --dataset ./my_photos --resolution 64 --output runs/photos

  difftool train --recipe cifar10 --set train.batch_size=64 --num-processes 8
"""


@user_errors
@options.holds_quiet
@registered_early
def train(
    recipe: options.Recipe = None,
    dataset: options.Dataset = None,
    resolution: Annotated[int | None, typer.Option(help="Image size in pixels (data.resolution).")] = None,
    image_column: Annotated[str | None, typer.Option(help="Image column of a hub data set (default: detected).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column of a hub data set; 'none' ignores labels.")] = None,
    channels: Annotated[int | None, typer.Option(help="1 (grayscale) or 3 (RGB); default from the data.")] = None,
    output: options.Output = None,
    overrides: options.Overrides = None,
    resume: Annotated[str | None, typer.Option(help="Continue a run exactly: RUN folder, one of its checkpoints, or 'latest'.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --output.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps to train for (train.max_steps).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (train.batch_size).")] = None,
    seed: options.Seed = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no, fp16 (GPU), bf16, or auto (bf16 where the hardware has it).")] = None,
    skip_nonfinite: Annotated[int | None, typer.Option(
        help="Skip up to N steps in a row whose gradients are NaN/inf instead of stopping (train.skip_nonfinite).")] = None,
    num_processes: options.NumProcesses = 1,
    main_process_port: options.MainProcessPort = None,
    dry_run: options.DryRun = False,
    quiet: options.Quiet = False,
) -> None:
    """Train a UNet2DModel with a DDPM noise schedule; writes a run folder (see README)."""
    from difftool.training.plan import plan_training

    values = {
        "data.resolution": resolution, "data.image_column": image_column, "data.label_column": label_column,
        "data.channels": channels, "train.max_steps": max_steps, "train.batch_size": batch_size,
        "train.seed": seed, "train.mixed_precision": mixed_precision, "train.skip_nonfinite": skip_nonfinite,
    }
    values = {k: v for k, v in values.items() if v is not None}
    plan = plan_training(recipe=recipe, dataset=dataset, overrides=overrides, values=values, output=output, resume=resume)
    if dry_run:
        return echo_plan(plan)
    if num_processes > 1:
        pinned = pins(plan, output) + (["--recipe", plan.cfg.recipe] if recipe is None and not plan.resume else [])
        raise typer.Exit(launch("difftool.train", worker_arguments(pinned), num_processes=num_processes, main_process_port=main_process_port))

    from difftool.training.loop import train as run_training

    result = run_training(plan.cfg, plan.output, resume=plan.resume, overwrite=overwrite,
                          why_recipe=plan.why, optional_eval=plan.optional_eval)
    if result.last_loss is not None and rank_zero():
        say(f"final loss {result.last_loss:.4f} at step {result.step}")


train.__doc__ = (train.__doc__ or "") + EXAMPLES


def echo_plan(plan) -> None:
    """--dry-run of a run command: why the recipe, the run folder, the checkpoint resumed, the resolved config."""
    typer.echo((f"# recipe {plan.cfg.recipe}: {plan.why}\n" if plan.why else "") + f"# run folder: {plan.output}"
               + (f"\n# resuming from: {plan.resume}" if plan.resume else ""))
    typer.echo(config_mod.dump_yaml(plan.cfg), nl=False)


def pins(plan, output) -> list[str]:
    """The plan's choices every worker of a multi-process run must share, so that none plans otherwise: the
    default run folder and the checkpoint `--resume RUN` stands for (the recipe chosen for the data: train's)."""
    return ([] if output else ["--output", str(plan.output)]) + (["--resume", str(plan.resume)] if plan.resume else [])
