"""What the benchmark scripts share: workers in fresh processes, medians, the machine, RESULTS.md.

Every timed run happens in its own Python process (the script calling itself with `--worker`),
so runs cannot warm each other's caches or allocators, each reports its own peak memory, and
accelerate's process-wide state starts clean. Implementations alternate run by run, so a machine
that slows down during the benchmark slows both sides alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARKER = "RESULT "  # a worker's last line: MARKER + JSON


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `python script --worker ... args` and return the JSON it reported."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def report(result: dict) -> None:
    """A worker's answer, with the peak memory of its process (CPU RSS, or CUDA peak allocated)."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARKER + json.dumps(result), flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """The hardware and versions every figure is recorded with."""
    import diffusers
    import torch

    import difftool

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        cpu = _cpu_name()
        bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        device = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads" + (", AVX512-BF16" if bf16 else "")
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"difftool {difftool.__version__}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def append_results(title: str, command: str, body: str) -> None:
    """Add one dated section to benchmarks/RESULTS.md (never rewriting earlier figures)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title} ({stamp})\n\n{machine()}\n\n```\n{command}\n```\n\n{body.rstrip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script named in it.\n")
    with RESULTS.open("a") as f:
        f.write(section)
    print(section)
