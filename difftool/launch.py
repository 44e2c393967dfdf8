"""`difftool train --num-processes N` hands itself over to `accelerate launch`.

The launcher reads the user's accelerate config (`accelerate config`), so multi-node and
mixed-precision settings made there keep working; we only add the process count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from difftool.errors import UserError


def accelerate_command(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None) -> list[str]:
    launcher = shutil.which("accelerate")
    cmd = [launcher] if launcher else [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher:
        cmd.append("launch")
    cmd += ["--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd.append("--multi_gpu")  # with Accelerator(cpu=True) on a CPU machine this means gloo ranks
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", module, *args]


def launch(module: str, args: list[str], *, num_processes: int, main_process_port: int | None = None) -> int:
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    cmd = accelerate_command(module, args, num_processes=num_processes, main_process_port=main_process_port)
    return subprocess.call(cmd)
