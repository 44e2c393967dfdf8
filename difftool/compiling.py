"""torch.compile's one requirement that fails late: on CPU, inductor builds C++ with the system's compiler.

Without a working compiler, torch.compile fails only at the first model call, after the data
has loaded or the output folder has been made, and as an internal error. Commands that compile
check first and refuse in one line.
"""

from __future__ import annotations

import torch

from difftool.errors import UserError, first_line


def check_can_compile(device: torch.device, option: str) -> None:
    """Refuse `option` (the flag or setting that asked for compilation) when inductor cannot build for `device`."""
    if device.type != "cpu":
        return  # on GPUs inductor writes Triton kernels, whose toolchain Triton checks and reports itself
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # private API moved in a newer torch: let torch.compile speak for itself
        return
    try:
        get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler, or whatever a newer torch raises for it
        raise UserError(f"{option} needs a working C++ compiler on a CPU (torch.compile builds C++ there) and none "
                        f"was found ({first_line(err)}); install g++ or clang++, or set CXX, or run without "
                        f"{option}") from err
