"""`difftool train --num-processes N` hands itself over to `accelerate launch`.

The launcher runs in this process and reads the user's accelerate config (`accelerate
config`), so multi-node and mixed-precision settings made there keep working; we add the
process count (and, without such a config, the defaults it would assume, to spare a warning). Running it in-process lets us turn "a worker failed" into one line: the
workers have already printed their own `difftool: error:` message, and the launcher's
traceback on top of it would only bury that message.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from difftool.errors import UserError


def launch_arguments(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None) -> list[str]:
    """What follows `accelerate launch` on the command line."""
    cmd = ["--num_processes", str(num_processes)]
    if not _has_accelerate_config():
        # What `accelerate launch` would assume anyway, said explicitly so it does not warn;
        # mixed precision and compilation come from the recipe, not from the launcher.
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd.append("--multi_gpu")  # with Accelerator(cpu=True) on a CPU machine this means gloo ranks
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", module, *args]


def forward_options(pairs: list[tuple[str, object]]) -> list[str]:
    """Options as the workers' command line: None dropped, True as a bare flag, lists repeated."""
    args: list[str] = []
    for flag, value in pairs:
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                args += [flag, str(item)]
    return args


def _has_accelerate_config() -> bool:
    from accelerate.commands.config import default_config_file

    return Path(default_config_file).is_file()


def launch(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None) -> int:
    """Run `accelerate launch ... -m module args`; returns the exit code (2 if a worker said 2)."""
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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
        # Ctrl-C / SIGTERM reached the launcher, which passed it on: the workers have saved a
        # checkpoint and stopped, as a single process would have.
        return 0
    return 0
