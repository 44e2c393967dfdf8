"""The machine a check runs on: GPU, driver, the versions of what difftool imports, the attainable peaks.

    python benchmarks/gpu_env.py                                  # prints the JSON
    python benchmarks/gpu_env.py --json env.json --peaks peaks.json

Every package is imported in turn and its version, or the first line of its import error, is
recorded: a device machine that lacks a carried wheel says which at once, instead of failing later
inside a benchmark. The peaks (the best FLOP/s of a large matmul and large 3x3 convolutions, per
dtype: benchmarks/common.py) are measured once here and shared by the throughput scripts (`--peaks`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attainable_peak, gpu_bf16_peak, machine, write_json

PACKAGES = ("torch", "diffusers", "accelerate", "transformers", "datasets", "huggingface_hub", "safetensors", "typer",
            "numpy", "scipy", "pyarrow", "fsspec", "triton", "difftool")  # pyarrow, fsspec: datasets pins them
NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.max.sm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the environment here (else print it)")
    parser.add_argument("--peaks", metavar="FILE", help="write the peaks here, as the throughput scripts' --peaks reads")
    parser.add_argument("--quick", action="store_true", help="measure the peaks on small sizes (smoke runs)")
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env, indent=2), flush=True)  # before the peaks: a crash there leaves the versions in the log
    env["peaks"] = {dtype: attainable_peak(dtype, quick=args.quick) for dtype in ("fp32", "bf16")}
    datasheet = gpu_bf16_peak()
    env["datasheet_bf16"] = {"name": datasheet[1], "flops_per_s": datasheet[0]} if datasheet else None
    write_json(args.peaks, env["peaks"])
    write_json(args.json, env)
    print(json.dumps({"peaks": env["peaks"], "datasheet_bf16": env["datasheet_bf16"]}, indent=2))


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "packages": {name: version(name) for name in PACKAGES},
           "nvidia_smi": nvidia_smi(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    try:
        env["machine"] = machine()  # the line RESULTS.md sections start with
    except ImportError:  # diffusers missing: "packages" says so
        env["machine"] = None
    return env


def version(name: str) -> str:
    """The package's version, or why it cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # ImportError, or a dependency's own error at import time
        return f"missing: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    found = getattr(module, "__version__", None)
    if found is None:
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = "unknown"
    return str(found)


def nvidia_smi() -> dict:
    """The GPU as the driver sees it: name, driver version, memory, top SM clock (or why there is none)."""
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": (proc.stderr or proc.stdout).strip()[:300] or f"exit {proc.returncode}"}
    values = [v.strip() for v in proc.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(NVIDIA_SMI_FIELDS, values, strict=False))


if __name__ == "__main__":
    main()
