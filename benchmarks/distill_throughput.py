"""Distillation on the GPU path: how fast a student trains, and what its 4 steps do to a 50,000-sample FID.

    python benchmarks/distill_throughput.py --recipe cifar10 --steps 40 --num-images 1024 --json distill.json
    python benchmarks/distill_throughput.py --recipe benchmarks/smoke.yaml --steps 4 --num-images 8 --no-record

A teacher of the recipe's network (one training step on the built-in shapes at the recipe's resolution: rates do
not depend on the weights) is distilled for --steps steps with `difftool distill` (its default method) in the
recipe's precision; the rate is the median img/s that metrics.jsonl logs after --warmup steps. Then
`difftool sample` makes --num-images images with the student's own sampler (4 steps, no guidance pass) and
with the teacher's default, each at the rate `sample` reports for its images (model loading left out); the
projection is 50,000 samples at each rate, the sampling part of a 50k FID.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, machine, median, publish  # noqa: E402

from difftool.config import read_config  # noqa: E402

FID_SAMPLES = 50_000
QUIET = ["--set", "eval.every=0", "--set", "sample.every=1000000", "--set", "checkpoint.every=1000000"]


def difftool(args: list[str], log: Path) -> str:
    """Run `difftool ARGS` (exit on failure); its output."""
    proc = subprocess.run([sys.executable, "-m", "difftool", *args], capture_output=True, text=True)
    with log.open("a") as out:
        out.write(f"$ difftool {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode:
        sys.exit(f"difftool {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def sampling_rate(output: str) -> float:
    """img/s from `difftool sample`'s last line ("done: N new of N images in S s (R img/s) ...")."""
    found = re.findall(r"\(([0-9.]+) img/s\)", output)
    if not found:
        sys.exit(f"no rate in difftool sample's output:\n{output[-2000:]}")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar10")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps timed (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=1024, help="images per sampling rate (also the batch)")
    add_output_options(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-throughput-") as tmp:
        work, log = Path(tmp), Path(tmp) / "log.txt"
        teacher, student = work / "teacher", work / "student"
        difftool(["train", "--recipe", args.recipe, "--dataset", "shapes", "--max-steps", "1", "--output", str(teacher),
                  "--quiet", *QUIET], log)
        start = time.perf_counter()
        difftool(["distill", str(teacher), "--max-steps", str(args.warmup + args.steps), "--output", str(student),
                  "--quiet", "--set", "log.every=1", *QUIET], log)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
        rate = median([r["img_per_s"] for r in records if "img_per_s" in r and r["step"] > args.warmup])
        configs = {name: read_config(source / "config.yaml") for name, source in (("student", student),
                                                                                   ("teacher", teacher))}
        batch = configs["student"].train.batch_size
        rates = {}
        for name, source in (("student", student), ("teacher", teacher)):
            out = difftool(["sample", str(source), "-n", str(args.num_images), "--batch-size", str(args.num_images),
                            "--output", str(work / f"samples-{name}"), "--quiet"], log)
            rates[name] = sampling_rate(out)
    described = {name: f"{c.sample.scheduler} {c.sample.steps} steps, guidance {c.sample.guidance_scale:g}"
                 for name, c in configs.items()}
    projection = {name: FID_SAMPLES / r for name, r in rates.items()}
    figures = {"distill_img_per_s": rate, "batch_size": batch, "distill_wall_s": wall, "sampling_img_per_s": rates,
               "fid_sampling_s": projection, "speedup": rates["student"] / rates["teacher"], "machine": machine()}
    body = (f"| | img/s | 50,000 samples |\n|---|---|---|\n"
            f"| distillation ({configs['student'].distill.method}), batch {batch} | {rate:.0f} | - |\n"
            + "".join(f"| sampling, {name} ({described[name]}), batch {args.num_images} | {rates[name]:.0f} | "
                      f"{projection[name]:.0f} s |\n" for name in ("student", "teacher"))
            + f"\nThe student samples {rates['student'] / rates['teacher']:.1f}× faster than its teacher's default; "
              f"{machine()}. Rates: the median of the logged img/s after {args.warmup} steps, and `difftool sample`'s "
              f"own rate for its {args.num_images} images (loading the model left out).")
    command = " ".join(["python", "benchmarks/distill_throughput.py", *sys.argv[1:]])
    publish(args, f"Distillation throughput, {args.recipe}", command, body, figures)


if __name__ == "__main__":
    main()
