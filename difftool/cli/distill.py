"""`difftool distill`: flags -> difftool.distilling.plan -> difftool.distilling.job.distill (or accelerate launch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftool.cli import options
from difftool.cli.errors import rank_zero, user_errors
from difftool.cli.launch import launch, worker_arguments
from difftool.cli.train import echo_plan, pins
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Examples:

  difftool distill runs/folder32-my_images          # a 4-step student in runs/folder32-my_images-distilled

  difftool sample runs/folder32-my_images-distilled -n 500   # ddim, 4 steps: what the student was made for

  difftool distill runs/folder32-my_images --recipe consistency --output runs/cd   # sampled with lcm, 1-8 steps

  difftool distill runs/cifar10 --steps 2 --max-steps 20000 --num-processes 8
"""


@user_errors
@options.holds_quiet
@registered_early
def distill(
    teacher: Annotated[str | None, typer.Argument(
        help="The model to distill: a run folder, a checkpoint, a model folder or .safetensors file, a hub id.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help=(
        "Distillation recipe: progressive (default; sampled with ddim), consistency (sampled with lcm), or a YAML file of the sections it changes.")) ] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=(
        "The images to distill on. Default: the teacher run's training data.")) ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps the student is made for (sample.steps; default 4).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(min=1.0, help=(
        "Guidance baked into a class-conditional student (distill.guidance_scale). Default: the teacher's recipe's.")) ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder. Default: runs/TEACHER-distilled.")] = None,
    overrides: options.Overrides = None,
    resume: Annotated[str | None, typer.Option(help="Continue a distillation exactly: its run folder or a checkpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --output.")] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (train.max_steps). Default: a quarter of the teacher's steps, at least 1000 (progressive); 1000 (consistency).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Global batch size (train.batch_size).")] = None,
    seed: options.Seed = None,
    num_processes: options.NumProcesses = 1,
    main_process_port: options.MainProcessPort = None,
    dry_run: options.DryRun = False,
    quiet: options.Quiet = False,
) -> None:
    """Distill a model into a few-step student (progressive or consistency distillation); writes a run folder like train."""
    from difftool.distilling.plan import plan_distillation

    values = {"sample.steps": steps, "distill.guidance_scale": guidance_scale, "train.max_steps": max_steps,
              "train.batch_size": batch_size, "train.seed": seed}
    values = {k: v for k, v in values.items() if v is not None}
    plan = plan_distillation(teacher=teacher, recipe=recipe, dataset=dataset, overrides=overrides, values=values,
                             output=output, resume=resume)
    if dry_run:
        return echo_plan(plan)
    if num_processes > 1:
        raise typer.Exit(launch("difftool.distill", worker_arguments(pins(plan, output)), num_processes=num_processes,
                                main_process_port=main_process_port))

    from difftool.distilling.job import distill as run_distillation

    result = run_distillation(plan.cfg, plan.output, resume=plan.resume, overwrite=overwrite,
                              optional_eval=plan.optional_eval)
    if result.last_loss is not None and rank_zero():
        say(f"final loss {result.last_loss:.4f} at step {result.step}")


distill.__doc__ = (distill.__doc__ or "") + EXAMPLES
