"""benchmarks/gpu_check.py's harness: stages isolated from each other, the budget, what comes back, the goals.

Stand-in stages of a line of Python each, so this runs in seconds; .ci/run runs the real stages on
tiny sizes (`gpu_check.sh --cpu-smoke`), which take a minute or two and are not repeated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402
import gpu_goals  # noqa: E402


def python(code: str):
    return lambda: [sys.executable, "-c", code]


def options(budget: int = 100) -> argparse.Namespace:
    return argparse.Namespace(cpu_smoke=True, budget=budget, record=False)


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def test_a_failing_or_overrunning_stage_leaves_the_others_and_its_log(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    pid_file = tmp_path / "worker.pid"
    overrun = ("import subprocess, sys, time; "
               "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pid_file)!r}, 'w').write(str(w.pid)); print('worker started', flush=True); time.sleep(60)")
    figures = work / "fine.json"
    stages = [gpu_check.Stage("fails", 30, python("print('boom'); raise SystemExit(3)")),
              gpu_check.Stage("overruns", 2, python(overrun)),
              gpu_check.Stage("works", 30, python(f"import json; json.dump({{'section': chr(10) + '## S' + chr(10)}}, "
                                                  f"open({str(figures)!r}, 'w'))"), figures)]
    report = gpu_check.run_all(stages, out, options(), gpu_check.SMOKE, work)
    assert [s["status"] for s in report["stages"]] == ["failed (exit 3)", "timeout", "ok"]
    assert not alive(int(pid_file.read_text())), "a stage's workers end with it"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.md", "summary.json", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "boom" in summary and "worker started" in summary  # each failure's log tail
    assert (out / "results.md").read_text() == "\n## S\n"
    assert json.loads((out / "summary.json").read_text())["figures"]["works"] == {"section": "\n## S\n"}


def test_stages_the_budget_cannot_hold_are_skipped(tmp_path):
    stages = [gpu_check.Stage("never", 30, python("raise SystemExit('ran')"))]
    report = gpu_check.run_all(stages, tmp_path, options(budget=5), gpu_check.SMOKE, tmp_path)
    assert report["stages"][0]["status"] == "skipped" and "budget" in report["stages"][0]["why"]


@pytest.mark.parametrize("sizes", [gpu_check.GPU, gpu_check.SMOKE])
def test_every_stage_has_a_limit_and_the_fid_stage_reads_the_first_sampling_figures(sizes, tmp_path):
    stages = gpu_check.plan(sizes, tmp_path)
    assert [s.name for s in stages][:3] == ["env", "gpu-tests", "train"] and stages[4].name == "fid"
    fid = stages[4].command()
    assert fid[fid.index("--sampling") + 1] == str(stages[3].figures)
    assert all(s.limit > 0 for s in stages)
    distill = stages[5].command()
    assert stages[5].name == "distill" and distill[distill.index("--recipe") + 1] == sizes.recipe


def test_goals_are_read_off_the_figures():
    def row(name, speed, mfu=None):
        return {"implementation": name, "img_per_s": speed, "utilisation": {"mfu": mfu}}

    report = {"figures": {
        "train": {"rows": [row("difftool", 300.0, 0.45), row("plain-fp32", 100.0), row("plain-bf16", 250.0)]},
        "sample-b1024": {"batch_size": 1024, "rows": {"ddim": [
            {"implementation": "pipeline", "steps": 50, "ratio": 1.0},
            {"implementation": "bf16-compile", "steps": 50, "ratio": 2.5}]}},
        "fid": {"projections": [{"implementation": "pipeline", "total_s": 100.0},
                                {"implementation": "bf16-compile", "total_s": 500.0}]},
        "distill": {"speedup": 24.0},
    }}
    found = {g["goal"]: (g["measured"], g["status"]) for g in gpu_goals.goals(report)}
    assert found["training: difftool's default ÷ plain-fp32"] == (3.0, "met")
    assert found["training: difftool's default ÷ plain-bf16"] == (1.2, "missed")
    assert found["training: MFU of the bf16 peak (difftool)"] == (0.45, "met")
    assert found["sampling ddim-50, batch 1024: bf16 + compile ÷ pipeline"] == (2.5, "missed")
    assert found["FID-50k through difftool (bf16-compile)"] == (500.0, "met"), "the pipeline is not difftool"
    assert found["sampling: a 4-step student ÷ its teacher's default (distill)"] == (24.0, "met")
    assert gpu_goals.goals({"figures": {}})[0]["status"] == "not measured"
