"""The whole GPU path, checked and measured in one command within a time budget (benchmarks/gpu_check.sh).

    bash benchmarks/gpu_check.sh                          # into $OUT (a device machine's output folder)
    bash benchmarks/gpu_check.sh results/ --record        # into results/, and append the sections to RESULTS.md
    bash benchmarks/gpu_check.sh /tmp/smoke --cpu-smoke   # tiny sizes on a CPU, in about a minute: what CI runs
    bash benchmarks/gpu_check.sh results/ --stages train,fid --budget 200      # a rerun of some stages

Stages, the most needed first, each in a fresh process with its own time limit, cut to what is left
of --budget: `env` (GPU, driver, versions, attainable peaks), `gpu-tests` (pytest -m gpu),
`train` (train_throughput.py: the cifar10 recipe at batch 128, difftool's default, bf16 and
bf16 + compile against the plain diffusers loop in fp32 and bf16), `sample-b1024` (sample_throughput.py:
DDIM-50 and DPM-Solver-20 against the pipelines, fp32, bf16, bf16 + compile), `fid` (fid_projection.py:
a 50,000-sample FID evaluation from that sampling rate, the feature pass and the metrics), `distill`
(distill_throughput.py: `difftool distill`'s training rate on the recipe's network, and the sampling part of a
50k FID at the student's 4 steps against the teacher's default), `sample-b256`
(fp32 and bf16 + compile; by the estimates made without a GPU, it may not fit in the budget: rerun it
with --stages sample-b256).
A stage that fails or runs out of time is reported so and the next one runs: every stage's output stays
in OUT/gpu_check.log, the figures measured so far in OUT/summary.json. OUT/results.md holds the
RESULTS.md sections of the stages that finished (--record appends them), OUT/summary.md the summary with
issue 18's goals, also printed at the end. Four files in all: a device machine sends back at most eight.

--cpu-smoke runs every stage on the CPU with a model of a few thousand parameters (benchmarks/smoke.yaml)
and fewer runs, to keep the harness working: the gpu tests are collected and skipped, and compilation is
switched off (TORCHDYNAMO_DISABLE=1, so the compile variants take their code path but run eagerly).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import append_section  # noqa: E402  (imports nothing heavy: this process never loads torch)
from gpu_goals import goals, summary_markdown  # noqa: E402

LOG, SUMMARY_JSON, SUMMARY_MD, RESULTS_MD = "gpu_check.log", "summary.json", "summary.md", "results.md"
BUDGET_S = 470  # 8 minutes, less the summary's few seconds
MIN_STAGE_S = 20  # a stage with less time left than this is skipped, not started


@dataclass(frozen=True)
class Sizes:
    """What each stage runs: the GPU figures, or a smoke run's tiny ones."""

    recipe: str
    train: list[str]
    samples: list[tuple[int, list[str]]]  # (batch, sample_throughput.py options), the FID's first
    fid: list[str]
    distill: list[str]
    tests: str  # where pytest looks for the gpu tests
    limits: dict[str, int]  # seconds per stage kind
    quick_peaks: bool = False
    env: dict[str, str] = field(default_factory=dict)


GPU = Sizes(
    recipe="cifar10",
    train=["--batch-size", "128", "--warmup", "10", "--steps", "30",
           "--implementations", "difftool,difftool-bf16,plain-fp32,plain-bf16,difftool-bf16-compile"],
    samples=[(1024, ["--samplers", "ddim,dpm-solver", "--variants", "fp32,bf16,bf16-compile"]),
             (256, ["--samplers", "ddim,dpm-solver", "--variants", "fp32,bf16-compile"])],  # last: may not fit
    fid=["--num-samples", "50000", "--feature-images", "5000"],
    distill=["--steps", "40", "--warmup", "10", "--num-images", "1024"],
    tests="tests",
    limits={"env": 60, "gpu-tests": 180, "train": 210, "sample": 180, "fid": 120, "distill": 150},
)
SMOKE = Sizes(
    recipe="benchmarks/smoke.yaml",  # stages run in the repository's root
    train=["--batch-size", "8", "--warmup", "1", "--steps", "2", "--implementations", "difftool-bf16-compile,plain-bf16"],
    samples=[(8, ["--samplers", "ddim", "--variants", "bf16-compile"]),
             (4, ["--samplers", "dpm-solver", "--variants", "fp32"])],
    fid=["--num-samples", "50000", "--feature-images", "8", "--feature-batch-size", "4", "--stand-in-size", "64",
         "--metric-images", "200", "--dims", "32"],
    distill=["--steps", "3", "--warmup", "1", "--num-images", "8"],
    tests="tests/test_gpu.py",  # collecting every test module would double the smoke's time
    limits={"env": 60, "gpu-tests": 120, "train": 120, "sample": 120, "fid": 60, "distill": 120},
    quick_peaks=True,
    env={"TORCHDYNAMO_DISABLE": "1"},
)


@dataclass
class Stage:
    name: str
    limit: int
    command: Callable[[], list[str]]  # built when the stage starts: it may read what earlier stages wrote
    figures: Path | None = None  # the JSON the stage writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT"),
                        help="folder for the log, summary and sections (default: $OUT)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the harness, not figures")
    parser.add_argument("--record", action="store_true", help="append the finished stages' sections to RESULTS.md")
    parser.add_argument("--stages", help="comma-separated stage names to run (default: all, in order)")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for all stages (default {BUDGET_S})")
    args = parser.parse_args()
    if not args.out:
        parser.error("give an output folder, or set OUT")
    if args.record and args.cpu_smoke:
        parser.error("--record takes GPU figures; a --cpu-smoke run's are not figures")
    sizes = SMOKE if args.cpu_smoke else GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        stages = plan(sizes, Path(tmp))
        names = [stage.name for stage in stages]
        chosen = names if not args.stages else [s for s in args.stages.split(",") if s]
        if set(chosen) - set(names):
            parser.error(f"unknown stages {sorted(set(chosen) - set(names))}; the stages are {', '.join(names)}")
        report = run_all([s for s in stages if s.name in chosen], out, args, sizes, Path(tmp))
    sys.exit(0 if all(s["status"] == "ok" for s in report["stages"]) else 1)


def plan(sizes: Sizes, work: Path) -> list[Stage]:
    """The stages in the order they run; each writes its figures to `work`."""
    python = sys.executable
    peaks = work / "peaks.json"

    def shared(figures: Path) -> list[str]:
        return ["--recipe", sizes.recipe, "--repeats", "1", "--no-double-batch", "--no-record",
                "--json", str(figures), *(["--peaks", str(peaks)] if peaks.is_file() else [])]

    def sample_stage(batch: int, options: list[str]) -> Stage:
        figures = work / f"sample-b{batch}.json"
        return Stage(f"sample-b{batch}", sizes.limits["sample"], lambda: [
            python, str(HERE / "sample_throughput.py"), "--num-images", str(batch), "--batch-size", str(batch),
            *options, *shared(figures)], figures)

    train = work / "train.json"
    fid = work / "fid.json"
    distill = work / "distill.json"
    big, *rest = [sample_stage(batch, options) for batch, options in sizes.samples]
    return [
        Stage("env", sizes.limits["env"], lambda: [
            python, str(HERE / "gpu_env.py"), "--json", str(work / "env.json"), "--peaks", str(peaks),
            *(["--quick"] if sizes.quick_peaks else [])], work / "env.json"),
        Stage("gpu-tests", sizes.limits["gpu-tests"], lambda: [
            python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
            f"--junitxml={work / 'gpu-tests.xml'}", sizes.tests], work / "gpu-tests.xml"),
        Stage("train", sizes.limits["train"], lambda: [
            python, str(HERE / "train_throughput.py"), *sizes.train, *shared(train)], train),
        big,
        Stage("fid", sizes.limits["fid"], lambda: [
            python, str(HERE / "fid_projection.py"), *sizes.fid, "--sampling", str(big.figures), "--no-record",
            "--json", str(fid)], fid),
        Stage("distill", sizes.limits["distill"], lambda: [
            python, str(HERE / "distill_throughput.py"), "--recipe", sizes.recipe, *sizes.distill, "--no-record",
            "--json", str(distill)], distill),
        *rest,
    ]


def run_all(stages: list[Stage], out: Path, args, sizes: Sizes, work: Path) -> dict:
    """Every stage in turn within the budget, the summary rewritten after each, and printed at the end."""
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)  # difftool from the tree
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, "DIFFTOOL_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **sizes.env}  # nothing is downloaded
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    report: dict = {"mode": mode, "started": _now(), "budget_s": args.budget, "stages": [], "figures": {}}
    deadline = time.monotonic() + args.budget
    (out / LOG).write_text(f"gpu_check {mode}, started {report['started']}\n")
    for stage in stages:
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            report["stages"].append({"name": stage.name, "status": "skipped", "seconds": 0, "limit": 0,
                                     "why": f"{left:.0f} s of the budget left"})
            continue
        limit = int(min(stage.limit, left))
        print(f"[gpu_check] {stage.name}: up to {limit} s", flush=True)
        result = run_stage(stage, out / LOG, limit, env)
        report["stages"].append(result)
        report["figures"][stage.name] = read_figures(stage)
        print(f"[gpu_check] {stage.name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        write_outputs(report, out, record=False)
    report["goals"] = goals(report)
    write_outputs(report, out, record=args.record)
    print((out / SUMMARY_MD).read_text())
    return report


def run_stage(stage: Stage, log: Path, limit: int, env: dict) -> dict:
    """Run one stage into the log; kill its whole process group when it outlives `limit`."""
    command = stage.command()
    start = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n===== {stage.name} (limit {limit} s): {' '.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)  # its workers too, so a timeout ends them all
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        seconds = time.monotonic() - start
        f.write(f"===== {stage.name}: {status} in {seconds:.1f} s\n")
    result = {"name": stage.name, "status": status, "seconds": seconds, "limit": limit}
    if status != "ok":
        result["log_tail"] = _stage_tail(log, stage.name)
    return result


def read_figures(stage: Stage):
    """What the stage wrote (JSON, or pytest's JUnit XML), or None."""
    if stage.figures is None or not stage.figures.is_file():
        return None
    if stage.figures.suffix == ".xml":
        return junit_counts(stage.figures)
    return json.loads(stage.figures.read_text())


def junit_counts(path: Path) -> dict:
    """Passed, failed, skipped and errored tests of a JUnit XML file, with the failures' first lines."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "problems": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[key] += 1
        message = (outcome.get("message") or key).splitlines()[0][:300]
        if key != "skipped":
            counts["problems"].append(f"{name}: {message}")
        else:
            counts.setdefault("reason", message)
    return counts


def write_outputs(report: dict, out: Path, *, record: bool) -> None:
    """summary.json, summary.md and results.md; with `record`, the sections appended to RESULTS.md."""
    sections = [figures["section"] for figures in report["figures"].values()
                if isinstance(figures, dict) and figures.get("section")]
    (out / SUMMARY_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / SUMMARY_MD).write_text(summary_markdown(report))
    (out / RESULTS_MD).write_text("".join(sections) or "No stage finished with figures.\n")
    if record:
        for section in sections:
            append_section(section)


def _stage_tail(log: Path, name: str, lines: int = 25) -> str:
    text = log.read_text(errors="replace")
    return "\n".join(text[text.rfind(f"\n===== {name} (limit"):].splitlines()[-lines:])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    main()
