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
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARKER = "RESULT "  # a worker's last line: MARKER + JSON


class WorkerFailed(SystemExit):
    """A worker process failed. Uncaught, the script stops with the worker's error; a script that catches it
    reports that implementation as failed and measures the others (one failure must not lose their figures)."""

    def last_line(self) -> str:
        lines = [line for line in str(self.code).splitlines() if line.strip()]
        return lines[-1] if lines else str(self.code)


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `python script --worker ... args` and return the JSON it reported."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise WorkerFailed(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def run_or_note(failed: dict[str, str], name: str, script: Path, args: list[str]) -> dict | None:
    """`run_worker`, or None with the error noted in `failed[name]` (printed too) when the worker failed."""
    try:
        return run_worker(script, args)
    except WorkerFailed as err:
        failed[name] = err.last_line()
        print(err.code, file=sys.stderr, flush=True)
        return None


def failures_note(failed: dict[str, str]) -> str:
    """The sentence under a table that names the implementations whose workers failed."""
    return "".join(f" **{name} failed**: `{error}`." for name, error in failed.items())


def report(result: dict) -> None:
    """A worker's answer, with the peak memory of its process (CPU RSS, or CUDA peak allocated)."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARKER + json.dumps(result), flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def add_output_options(parser) -> None:
    """The options every throughput script shares: where its figures go, and peaks measured before."""
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (updated after every run, so "
                                                       "a run stopped midway leaves what it measured)")
    parser.add_argument("--peaks", metavar="FILE", help="the attainable peaks as JSON {\"fp32\": FLOP/s, \"bf16\": "
                                                        "FLOP/s}, measured once by benchmarks/gpu_env.py, instead of "
                                                        "measuring them again")


def write_json(path: str | Path | None, data: dict) -> None:
    """Write `data` to `path` atomically (nothing when `path` is None): a reader never sees half a file."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def publish(args, title: str, command: str, body: str, figures: dict) -> None:
    """A script's result: its RESULTS.md section appended (or printed with --no-record), and in --json."""
    section = format_section(title, command, body)
    write_json(args.json, {**figures, "title": title, "command": command, "section": section})
    if args.no_record:
        print(body)
    else:
        append_section(section)


# ---------------------------------------------------------------- how close to the hardware's limit

# Dense bf16 tensor-core peaks from the datasheets, for model FLOPs utilisation (MFU) on known cards.
# Names as torch.cuda.get_device_name gives them; an H100 named by memory alone ("H100 80GB HBM3") is the SXM card.
# The datasheets give the peak "with sparsity"; dense is half of it. H200 SXM: 1,979 TFLOPS bf16 with sparsity
# (NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/), so 989 dense, the
# H100 SXM's figure; a bf16 8192^3 matmul measured 769-798 TFLOP/s on the lent H200 (device KINDS.md, 2026-11).
GPU_BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                 "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def model_flops_per_image(unet, *, training: bool) -> float:
    """Floating-point operations one image costs: a forward (sampling) or forward + backward (training).

    Counted by torch's FlopCounterMode on the real model (convolutions, matmuls, attention), so
    the figure follows the architecture rather than a formula; elementwise work is not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    batch = 2
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.zeros(batch, dtype=torch.long) if cfg.num_class_embeds else None
    with FlopCounterMode(display=False) as counter:
        if training:
            unet(x, t, class_labels=labels).sample.square().mean().backward()
        else:
            with torch.no_grad():
                unet(x, t, class_labels=labels)
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def attainable_peak(dtype_name: str, *, quick: bool = False) -> float:
    """The best FLOP/s of a large matmul and of large 3x3 convolutions in this dtype on this machine.

    The UNet's time is nearly all 3x3 convolutions, which oneDNN runs faster than a CPU matmul,
    so both are tried; each is timed several times and the best kept. `quick` uses small sizes (a
    256² matmul, convolutions of batch 1): for smoke runs, not figures.
    """
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = 4 if device == "cuda" else 1
    n, batches = (256, 1) if quick else (2048 * scale, scale)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    candidates = [(lambda: a @ b, 2 * n**3)]
    for channels, size, batch in ((256, 8, 64), (512, 8, 16), (128, 16, 32)):
        batch = max(1, batch // 64) if quick else batch * batches
        x = torch.randn(batch, channels, size, size, dtype=dtype, device=device)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype, device=device)
        candidates.append((lambda x=x, w=w: F.conv2d(x, w, padding=1), 2 * batch * channels**2 * 9 * size * size))
    best = 0.0
    with torch.inference_mode():
        for op, flops in candidates:
            op()
            for _ in range(3):
                _sync()
                start = time.perf_counter()
                for _ in range(3):
                    op()
                _sync()
                best = max(best, 3 * flops / (time.perf_counter() - start))
    return best


def gpu_bf16_peak() -> tuple[float, str] | None:
    """The card's datasheet bf16 peak and its name, when this is a known GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, peak in GPU_BF16_PEAK.items():  # specific names come before the general ones they contain
        if key in name:
            return peak, name
    return None


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flop_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e13 else f"{flops_per_s / 1e9:,.0f} GFLOP/s"


class Utilisation:
    """A benchmark's utilisation column: model FLOP/s per row against peaks measured once, at the start
    (or read from `peaks`, a file that benchmarks/gpu_env.py wrote, so that several scripts share them)."""

    def __init__(self, unet, *, training: bool, peaks: str | Path | None = None):
        self.flops_per_image = model_flops_per_image(unet, training=training)
        self.peaks = (json.loads(Path(peaks).read_text()) if peaks
                      else {dtype: attainable_peak(dtype) for dtype in ("fp32", "bf16")})
        self.datasheet = gpu_bf16_peak()

    def figures(self, img_per_s: float, dtype_name: str, calls_per_image: int = 1) -> dict:
        """Achieved model FLOP/s, its share of the peak for the dtype computed in, and the MFU on a known GPU."""
        achieved = img_per_s * calls_per_image * self.flops_per_image
        return {"flops_per_s": achieved, "share_of_peak": achieved / self.peaks[dtype_name],
                "mfu": achieved / self.datasheet[0] if self.datasheet else None}

    def cell(self, img_per_s: float, dtype_name: str, calls_per_image: int = 1) -> str:
        """The figures as a table cell."""
        f = self.figures(img_per_s, dtype_name, calls_per_image)
        cell = f"{flop_rate(f['flops_per_s'])}, {100 * f['share_of_peak']:.0f}% of {dtype_name} peak"
        if f["mfu"] is not None:
            cell += f", MFU {100 * f['mfu']:.1f}%"
        return cell

    def note(self) -> str:
        """The peaks the column is measured against, as one sentence."""
        measured = ", ".join(f"{name} {flop_rate(value)}" for name, value in self.peaks.items())
        note = (f"Utilisation: model FLOP/s ÷ this machine's attainable peak in the dtype the UNet computes in, the "
                f"best of a large matmul and large 3x3 convolutions ({measured})")
        if self.datasheet:
            note += f"; MFU: ÷ the {self.datasheet[1]} datasheet bf16 peak, {self.datasheet[0] / 1e12:.0f} TFLOP/s"
        return note + "."


def machine() -> str:
    """The hardware and versions every figure is recorded with."""
    import diffusers
    import torch

    import difftool

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
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


def format_section(title: str, command: str, body: str) -> str:
    """One dated RESULTS.md section: title, machine and versions, the command, the figures."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"\n## {title} ({stamp})\n\n{machine()}\n\n```\n{command}\n```\n\n{body.rstrip()}\n"


def append_section(section: str) -> None:
    """Add a section to benchmarks/RESULTS.md (never rewriting earlier figures)."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script named in it.\n")
    with RESULTS.open("a") as f:
        f.write(section)
    print(section)


def append_results(title: str, command: str, body: str) -> None:
    """Add one dated section to benchmarks/RESULTS.md."""
    append_section(format_section(title, command, body))
