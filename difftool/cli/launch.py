"""`difftool train --num-processes N` hands itself over to `accelerate launch`.

The launcher runs in this process and reads the user's accelerate config (`accelerate
config`), so multi-node and mixed-precision settings made there keep working; we add the
process count (and, without such a config, the defaults it would assume, to spare a warning). Running it in-process lets us turn "a worker failed" into one line: the
workers have already printed their own `difftool: error:` message, and the launcher's
traceback on top of it would only bury that message.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click

from difftool.cli.errors import debug_enabled
from difftool.errors import UserError
from difftool.threads import ceiling, usable_cores

LAUNCH_OPTIONS = ("--num-processes", "--main-process-port")  # the launcher's; a worker runs alone
COMMAND_ARGS = "difftool.command_args"  # key in click's shared context meta: the arguments after the command name


def launch_arguments(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None) -> list[str]:
    """What follows `accelerate launch` on the command line."""
    cmd = ["--num_processes", str(num_processes)]
    if not _has_accelerate_config():
        # What `accelerate launch` would assume anyway, said explicitly so it does not warn;
        # mixed precision and compilation come from the recipe, not from the launcher.
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd.append("--multi_gpu")  # with Accelerator(cpu=True) on a CPU machine this means gloo ranks
    if ceiling() is None:
        # accelerate would give each process 1 thread (its OMP_NUM_THREADS) whatever the cores: the processes
        # divide them instead, and each takes its fair share up to that (difftool/threads.py)
        cmd += ["--num_cpu_threads_per_process", str(max(1, usable_cores() // num_processes))]
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", module, *args]


def worker_arguments(pinned: list[str] | None = None) -> list[str]:
    """The running command's arguments as the user typed them, for its workers: less the launcher's own
    options and --debug (which travels as DIFFTOOL_DEBUG), plus `pinned`, choices made here that every
    worker must share (given last, so they win over what was typed)."""
    typed = click.get_current_context().meta.get(COMMAND_ARGS, [])
    args: list[str] = []
    skip_value = False
    for index, arg in enumerate(typed):
        if skip_value:
            skip_value = False
        elif arg == "--":
            args += typed[index:]
            break
        elif arg.split("=", 1)[0] in LAUNCH_OPTIONS:
            skip_value = "=" not in arg
        elif arg != "--debug":
            args.append(arg)
    return args + (pinned or [])


def _has_accelerate_config() -> bool:
    from accelerate.commands.config import default_config_file

    return Path(default_config_file).is_file()


def launch(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None,
           stopped_code: int = 0) -> int:
    """Run `accelerate launch ... -m module args`; returns the exit code (2 if a worker said 2).

    Ctrl-C or SIGTERM that reaches the launcher once the workers run is passed on by torch's agent, and the
    workers stop as one process would (`train` saves a checkpoint); `stopped_code` is then the exit code,
    the one the command exits with alone: 0 for `train`, 130 for `sample` and `evaluate`."""
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if debug_enabled():
        os.environ["DIFFTOOL_DEBUG"] = "1"  # the workers' environment is this process's
    parsed = launch_command_parser().parse_args(
        launch_arguments(module, args, num_processes=num_processes, main_process_port=main_process_port))
    try:
        launch_command(parsed)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        return 2 if codes == [2] else 1
    except subprocess.CalledProcessError as err:
        return err.returncode
    except SignalException:
        return stopped_code  # accelerate < 1.16 lets the agent's exception through
    except SystemExit as exit_:
        # accelerate >= 1.16 turns the agent's SignalException into exit 128 + signal number.
        if isinstance(exit_.__context__, SignalException):
            return stopped_code
        raise
    return 0
