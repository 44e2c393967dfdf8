"""The malloc tuning that keeps CPU training from faulting in fresh pages every step."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from difftool.allocator import keep_freed_memory

BLOCK = 4 * 2**20  # the size of an activation of a small model; glibc would trim a heap of 8 of them


def step_faults(cycles: int = 5) -> int:
    """Minor page faults of allocating, touching and freeing 8 activation-sized blocks, per cycle."""
    def cycle() -> None:
        blocks = [torch.ones(BLOCK, dtype=torch.uint8) for _ in range(8)]
        del blocks

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // cycles


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_activations_are_reused_without_page_faults():
    fresh_pages = 8 * BLOCK // resource.getpagesize()
    assert keep_freed_memory()
    # The least of three measurements: the kernel's own reclaim (DAMON, khugepaged) can fault a page of a
    # warm heap back in now and then; without the tuning every cycle faults in all `fresh_pages`.
    assert min(step_faults() for _ in range(3)) < fresh_pages / 20
