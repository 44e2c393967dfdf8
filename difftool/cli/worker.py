"""What each `accelerate launch` worker runs: one command alone, parsed and reported as the CLI does.

`difftool train|sample|evaluate --num-processes N` launch `python -m difftool.<command>`; those three
modules are thin entry points that call `run_single_command` here, so the library never imports `cli/`.
"""

from __future__ import annotations

import typer

from difftool.cli import distill, evaluate, img2img, sample, train
from difftool.cli.app import _run

COMMANDS = {"train": train.train, "distill": distill.distill, "sample": sample.sample, "evaluate": evaluate.evaluate,
            "img2img": img2img.img2img}


def run_single_command(name: str) -> None:
    """Entry for `python -m difftool.<name>` (what `accelerate launch -m` runs): that command alone.

    A worker that succeeded leaves its process group before the interpreter shuts down: gloo's threads still
    running then abort it now and then ("terminate called without an active exception", exit -6, seen once
    in the suite's two-process tests; pytorch/pytorch#190489). After a failure it does not: leaving waits on
    the other processes, which may be stuck in a collective the failed one never reached.
    """
    single = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    single.command(name)(COMMANDS[name])
    try:
        _run(single)
    except SystemExit as ended:
        if not ended.code:
            leave_process_group()
        raise
    leave_process_group()


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
