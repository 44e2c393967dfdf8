"""Two difftool jobs on one CPU: how much of its solo speed each keeps when another runs beside it.

    python benchmarks/contention.py                          # the quickstart model, 40 s windows
    python benchmarks/contention.py --seconds 20 --policies all-cores,default --no-record
    python benchmarks/contention.py --from-json benchmarks/figures/contention.json   # the figure again, no runs

Whole processes, as users run them: `difftool train` of the quickstart recipe (its own 32-px shapes,
its own batch and precision) and `difftool sample` of a run's model (DDIM, 20 steps, batches of 8).
Training speed is read from the steps appearing in its metrics.jsonl, sampling speed from the images
appearing in its output folder, each over a window after a warm-up, so neither counts start-up time.
Four situations per thread policy: train alone, sample alone, train with a sample beside it, two
trains at once. A policy is the environment both jobs start with: `all-cores` is difftool 0.1.0's
behaviour (every process takes every core, DIFFTOOL_THREADS set to the core count), `default` is the
thread policy of `difftool.threads` (a fair share of the cores, adjusted as jobs come and go).
Ratios are to the same policy's solo speeds, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, publish

POLICIES = {"all-cores": {"DIFFTOOL_THREADS": str(len(os.sched_getaffinity(0)))}, "default": {},
            "omp-1": {"OMP_NUM_THREADS": "1"},
            "omp-passive": {"OMP_WAIT_POLICY": "PASSIVE", "DIFFTOOL_THREADS": str(len(os.sched_getaffinity(0)))}}
LABELS = {"all-cores": "every job takes all cores (difftool 0.1.0)", "default": "a fair share each (difftool.threads)",
          "omp-1": "OMP_NUM_THREADS=1", "omp-passive": "all cores, OMP_WAIT_POLICY=PASSIVE"}
WARM_STEPS = 10  # training steps before a window opens (data cache, allocator, first previews)
WARM_IMAGES = 8  # one batch of samples before a window opens
LOG_EVERY = 2
FIGURE = Path(__file__).resolve().parent / "figures" / "contention.png"


def difftool(*args: str) -> list[str]:
    exe = shutil.which("difftool")
    return [exe, *args] if exe else [sys.executable, "-m", "difftool", *args]


def env_of(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DIFFTOOL_THREADS", "OMP_WAIT_POLICY")}
    return {**env, **POLICIES[policy], "PYTHONWARNINGS": "ignore"}


class Job:
    """One difftool process and how far it has got (training steps, or images written)."""

    def __init__(self, kind: str, folder: Path, policy: str, model: Path | None = None):
        self.kind, self.folder = kind, folder
        args = (["train", "--recipe", "quickstart", "--output", str(folder), "-q", "--set", "train.max_steps=100000",
                 "--set", f"log.every={LOG_EVERY}", "--set", "sample.every=100000", "--set", "checkpoint.every=100000",
                 "--set", "eval.every=0"] if kind == "train" else
                ["sample", str(model), "-n", "100000", "--steps", "20", "--scheduler", "ddim", "--batch-size", "8",
                 "-o", str(folder), "-q"])
        self.proc = subprocess.Popen(difftool(*args), env=env_of(policy), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def progress(self) -> int:
        """Images made so far: training steps times the batch, or sample PNGs written."""
        if self.kind == "sample":
            return sum(1 for p in self.folder.glob("*.png") if p.name != "grid.png") if self.folder.is_dir() else 0
        metrics = self.folder / "metrics.jsonl"
        steps = 0
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    steps = max(steps, json.loads(line).get("step", 0))
                except ValueError:
                    pass
        return steps * self.batch

    @property
    def batch(self) -> int:
        config = self.folder / "config.yaml"
        if config.is_file():
            import yaml

            return int(yaml.safe_load(config.read_text())["train"]["batch_size"])
        return 0

    def wait_warm(self, timeout: float = 600) -> None:
        needed = WARM_IMAGES if self.kind == "sample" else WARM_STEPS * max(self.batch, 1)
        start = time.time()
        while self.progress() < needed or (self.kind == "train" and not self.batch):
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} ended early: {self.proc.stderr.read()[-2000:]}")
            if time.time() - start > timeout:
                raise SystemExit(f"{self.kind} made no progress in {timeout} s")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def rates(jobs: list[Job], seconds: float) -> list[float]:
    """img/s of each job over one window of `seconds`, all windows the same."""
    before, start = [j.progress() for j in jobs], time.time()
    time.sleep(seconds)
    after, elapsed = [j.progress() for j in jobs], time.time() - start
    return [(a - b) / elapsed for a, b in zip(after, before)]


def situation(jobs_wanted: list[str], policy: str, model: Path, seconds: float, root: Path) -> list[float]:
    """Start the jobs (trains first, each warm before the next starts), measure them together, stop them."""
    jobs = []
    try:
        for i, kind in enumerate(jobs_wanted):
            jobs.append(Job(kind, root / f"{kind}-{i}-{time.time_ns()}", policy, model))
            jobs[-1].wait_warm()
        for job in jobs:  # a job started later may have slowed the earlier ones down to their new pace
            job.wait_warm()
        return rates(jobs, seconds)
    finally:
        for job in jobs:
            job.stop()


def make_model(root: Path) -> Path:
    run = root / "model-run"
    subprocess.run(difftool("train", "--recipe", "quickstart", "--output", str(run), "-q", "--set",
                            "train.max_steps=2", "--set", "sample.every=100000", "--set", "eval.every=0"),
                   check=True, env=env_of("default"), stdout=subprocess.DEVNULL)
    return run


def measure(policy: str, model: Path, seconds: float, repeats: int, root: Path) -> dict:
    cases = {"train": ["train"], "sample": ["sample"], "train+sample": ["train", "sample"], "train+train": ["train", "train"]}
    found = {name: [] for name in cases}
    for _ in range(repeats):
        for name, kinds in cases.items():
            found[name].append(situation(kinds, policy, model, seconds, root))
            print(policy, name, [round(r, 1) for r in found[name][-1]], flush=True)
    return {name: [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))] for name, runs in found.items()}


def table(results: dict) -> str:
    rows = ["| policy | train alone | sample alone | train + sample: train | train + sample: sample | "
            "two trains: each | together, train + sample | together, two trains |", "|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        train, sample = r["train"][0], r["sample"][0]
        ts, tt = r["train+sample"], r["train+train"]
        share = [ts[0] / train, ts[1] / sample, tt[0] / train, tt[1] / train]
        rows.append(f"| {policy} | {train:.1f} img/s | {sample:.2f} img/s | {ts[0]:.1f} ({share[0]:.0%}) | "
                    f"{ts[1]:.2f} ({share[1]:.0%}) | {tt[0]:.1f} ({share[2]:.0%}), {tt[1]:.1f} ({share[3]:.0%}) | "
                    f"{share[0] + share[1]:.0%} | {share[2] + share[3]:.0%} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Bars: each job's share of its solo speed, per situation and policy, the 40% goal drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("train beside a sample", "train+sample", 0, "train"), ("sample beside a train", "train+sample", 1, "sample"),
            ("first of two trains", "train+train", 0, "train"), ("second of two trains", "train+train", 1, "train")]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=120)
    width = 0.8 / len(results)
    for k, (policy, r) in enumerate(results.items()):
        shares = [100 * r[case][i] / r[solo][0] for _, case, i, solo in bars]
        xs = [j + (k - (len(results) - 1) / 2) * width for j in range(len(bars))]
        ax.bar(xs, shares, width, label=LABELS.get(policy, policy))
        for x, v in zip(xs, shares):
            ax.text(x, v + 1, f"{v:.0f}%", ha="center", fontsize=8)
    ax.axhline(40, color="grey", linestyle="--", linewidth=1)
    ax.text(-0.45, 41, "goal: 40% each", ha="left", fontsize=8, color="grey")
    ax.set_xticks(range(len(bars)), [name for name, *_ in bars], fontsize=8)
    ax.set_ylabel("% of its speed alone")
    ax.set_ylim(0, 110)
    ax.set_title("Two difftool jobs on one 2-core CPU", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40, help="length of each measuring window")
    parser.add_argument("--repeats", type=int, default=1, help="windows per situation (medians)")
    parser.add_argument("--policies", default="all-cores,default", help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--figure", default=str(FIGURE), help="where the bar chart goes (PNG)")
    parser.add_argument("--from-json", metavar="FILE", help="draw the figure and table of an earlier --json, no runs")
    add_output_options(parser)
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())["results"]
        plot(results, Path(args.figure))
        print(table(results))
        return
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policy {unknown[0]}; choose from {', '.join(POLICIES)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root)
        results = {policy: measure(policy, model, args.seconds, args.repeats, root) for policy in policies}
    plot(results, Path(args.figure))
    command = "python benchmarks/contention.py " + " ".join(sys.argv[1:])
    body = (table(results) + f"\n\nWindows of {args.seconds:.0f} s after a warm-up ({WARM_STEPS} training steps, "
            f"{WARM_IMAGES} samples), median of {args.repeats}; percentages are of the same policy's solo speed. "
            f"Training: the quickstart recipe as it ships; sampling: DDIM-20 of its model, batches of 8."
            f"\n\n![each job's share of its solo speed](figures/{Path(args.figure).name})")
    publish(args, "Two jobs on one CPU (contention)", command.strip(), body, {"results": results})


if __name__ == "__main__":
    main()
