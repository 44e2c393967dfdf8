"""Keep freed memory in the process: glibc's malloc defaults cost CPU training about 10%.

glibc serves large blocks with fresh `mmap`s and trims the top of its heap whenever enough of it
is free; its thresholds adapt, but only to the sizes it has seen freed. In a training step every
activation (tens of MB for the CIFAR-10 model) is freed and allocated again, so depending on the
order of earlier allocations a process can fault in about a gigabyte of new zeroed pages per step
(measured: 240k page faults per UNet forward, 0.4 s of 2.9 s). Serving blocks up to 32 MiB from
the heap and never trimming it removes them (see benchmarks/RESULTS.md). The cost: memory freed
after the peak stays with the process instead of going back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's own upper bound for M_MMAP_THRESHOLD on 64-bit systems
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; False where there is no glibc (macOS, musl, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
