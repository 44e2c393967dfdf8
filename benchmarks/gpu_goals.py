"""The GPU check's verdicts and summary: issue 18's goals read off the stages' figures, as Markdown.

Kept apart from gpu_check.py, which runs the stages, so that either can change alone. Figures a stage
did not produce (it failed, ran out of time, or was not chosen) give "not measured", never an error.
"""

from __future__ import annotations

# Issue 18's goals: ratios within one run, so machines and versions cancel out.
TRAIN_VS_PLAIN_FP32 = 2.5  # difftool's default for the cifar10 recipe ÷ the plain diffusers loop in fp32
TRAIN_VS_PLAIN_BF16 = 1.3  # ... ÷ that loop under bf16 autocast
TRAIN_MFU = 0.40  # of the datasheet bf16 peak
SAMPLE_VS_PIPELINE = 3.0  # `--dtype bf16 --compile` ÷ the diffusers pipeline at the same steps
FID_50K_S = 600  # a 50,000-sample FID of the cifar10 model, in seconds
STUDENT_VS_TEACHER = 20.0  # issue 40: a distilled student's sampling rate ÷ its teacher's default's


def goals(report: dict) -> list[dict]:
    """Each goal with its target, what was measured, and met / missed / not measured."""
    figures = report["figures"]
    found = []
    train = {row["implementation"]: row for row in (figures.get("train") or {}).get("rows", [])}
    for plain, target in (("plain-fp32", TRAIN_VS_PLAIN_FP32), ("plain-bf16", TRAIN_VS_PLAIN_BF16)):
        ratio = (train["difftool"]["img_per_s"] / train[plain]["img_per_s"]
                 if "difftool" in train and plain in train else None)
        found.append(_goal(f"training: difftool's default ÷ {plain}", target, ratio, "×"))
    mfus = {name: row["utilisation"]["mfu"] for name, row in train.items()
            if name.startswith("difftool") and row["utilisation"]["mfu"] is not None}
    best = max(mfus, key=mfus.get) if mfus else None
    found.append(_goal(f"training: MFU of the bf16 peak ({best or 'no known GPU'})", TRAIN_MFU,
                       mfus.get(best), "%"))
    for stage, stage_figures in figures.items():
        if not stage.startswith("sample-"):
            continue
        for sampler, rows in ((stage_figures or {}).get("rows") or {}).items():
            row = next((row for row in rows if row["implementation"] == "bf16-compile"), None)
            found.append(_goal(f"sampling {sampler}-{rows[0]['steps']}, batch "
                               f"{stage_figures['batch_size']}: bf16 + compile ÷ pipeline", SAMPLE_VS_PIPELINE,
                               row["ratio"] if row else None, "×"))
    ours = [p for p in (figures.get("fid") or {}).get("projections") or [] if p["implementation"] != "pipeline"]
    fastest = min(ours, key=lambda p: p["total_s"]) if ours else None
    found.append(_goal(f"FID-50k through difftool ({fastest['implementation'] if fastest else 'no sampling figures'})",
                       FID_50K_S, fastest["total_s"] if fastest else None, "s", at_most=True))
    found.append(_goal("sampling: a 4-step student ÷ its teacher's default (distill)", STUDENT_VS_TEACHER,
                       (figures.get("distill") or {}).get("speedup"), "×"))
    return found


def _goal(name: str, target: float, measured: float | None, unit: str, *, at_most: bool = False) -> dict:
    if measured is None:
        status = "not measured"
    else:
        status = "met" if (measured <= target if at_most else measured >= target) else "missed"
    return {"goal": name, "target": target, "measured": measured, "unit": unit, "at_most": at_most, "status": status}


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return {"×": f"{value:.2f}×", "%": f"{100 * value:.1f}%", "s": f"{value:.0f} s" if value < 120
            else f"{value / 60:.1f} min"}[unit]


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def summary_markdown(report: dict) -> str:
    """What a person reads first: the machine, each stage's outcome, the goals, the key figures, failures."""
    figures = report["figures"]
    lines = [f"# GPU check ({report['mode']}), started {report['started']}", "", _machine(figures.get("env")), ""]
    if report["mode"] == "cpu-smoke":
        lines += ["A smoke run: a tiny model on the CPU, compilation off. It checks the harness; its figures "
                  "and verdicts are not measurements.", ""]
    lines += ["| stage | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']}{' (' + s['why'] + ')' if s.get('why') else ''} | {s['seconds']:.0f} | "
              f"{s['limit']} |" for s in report["stages"]]
    tests = figures.get("gpu-tests")
    if tests:
        lines += ["", f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped" + (f" ({tests['reason']})" if tests.get("reason") else "")]
        lines += [f"- {problem}" for problem in tests["problems"]]
    if "goals" in report:
        lines += ["", "## Goals (issue 18)", "", "| goal | target | measured | status |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {'≤' if g['at_most'] else '≥'} {_amount(g['target'], g['unit'])} | "
                  f"{_amount(g['measured'], g['unit'])} | {g['status']} |" for g in report["goals"]]
    lines += _train_lines(figures.get("train")) + _sample_lines(figures) + _fid_lines(figures.get("fid"))
    for stage in report["stages"]:
        if stage.get("log_tail"):
            lines += ["", f"## {stage['name']}: {stage['status']}, the end of its log", "", "```",
                      stage["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def _machine(env: dict | None) -> str:
    if not env:
        return "Environment: not measured (the env stage did not finish)."
    packages = ", ".join(f"{name} {value}" for name, value in env["packages"].items())
    smi = env["nvidia_smi"]
    gpu = (f"{env['gpu']} ({env['gpu_memory_gib']:.0f} GiB, capability {env['capability']}), driver "
           f"{smi.get('driver_version', smi.get('error'))}, CUDA {env['cuda']}, cuDNN {env['cudnn']}"
           if env["cuda_available"] else f"no CUDA device (nvidia-smi: {smi.get('error', smi)})")
    peaks = ", ".join(f"{dtype} {value / 1e12:.1f} TFLOP/s" for dtype, value in env["peaks"].items())
    datasheet = env.get("datasheet_bf16")
    return (f"{gpu}; {env['cpus']} CPUs; Python {env['python']}; {packages}. Attainable peaks measured: {peaks}"
            + (f"; datasheet bf16 ({datasheet['name']}): {datasheet['flops_per_s'] / 1e12:.0f} TFLOP/s" if datasheet
               else "") + ".")


def _train_lines(train: dict | None) -> list[str]:
    if not train:
        return []
    if not train.get("rows"):  # stopped midway: the runs it finished
        return ["", "Training runs finished: " + ", ".join(
            f"{name} {runs[0]['img_per_s']:.1f} img/s" for name, runs in train["runs"].items() if runs)]
    rows = {row["implementation"]: row for row in train["rows"]}
    lines = ["", f"## Training, {train['recipe']} recipe, batch {train['batch_size']}", "",
             "| implementation | precision | img/s | ÷ plain-fp32 | ÷ plain-bf16 | MFU | peak GPU memory |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        ratios = [f"{row['img_per_s'] / rows[p]['img_per_s']:.2f}×" if p in rows else "-"
                  for p in ("plain-fp32", "plain-bf16")]
        lines.append(f"| {name} | {row['precision']} | {row['img_per_s']:.1f} | {' | '.join(ratios)} | "
                     f"{_amount(row['utilisation']['mfu'], '%')} | {_mib(row['peak_cuda_mib'])} |")
    return lines


def _sample_lines(figures: dict) -> list[str]:
    lines = []
    for stage, sample in figures.items():
        if not stage.startswith("sample-") or not sample:
            continue
        for sampler, rows in sample.get("rows", {}).items():
            lines += ["", f"## Sampling {sampler}, batch {sample['batch_size']}", "",
                      "| implementation | img/s | ÷ pipeline | compiling | max pixel diff | peak GPU memory |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['implementation']} | {r['img_per_s']:.1f} | {r['ratio']:.2f}× | "
                      f"{_amount(r['compile_s'] or None, 's')} | {r['max_pixel_diff']} | {_mib(r['peak_cuda_mib'])} |"
                      for r in rows]
        unfinished = {s: runs for s, runs in sample.get("runs", {}).items() if s not in sample.get("rows", {})}
        for sampler, runs in unfinished.items():
            lines += ["", f"Sampling {sampler}, batch {sample['batch_size']}, runs finished: " + ", ".join(
                f"{name} {r[0]['img_per_s']:.1f} img/s" for name, r in runs.items() if r)]
    return lines


def _fid_lines(fid: dict | None) -> list[str]:
    if not fid:
        return []
    lines = ["", f"## FID-{fid['num_samples'] // 1000}k projection", "",
             f"Feature pass {fid['feature_pass']['img_per_s']:.0f} img/s on {fid['feature_pass']['device']}; "
             f"metrics {fid['metrics']['seconds']:.1f} s."]
    lines += [f"- {p['implementation']}, batch {p['batch_size']}: {p['total_s'] / 60:.1f} min (sampling "
              f"{p['sampling_s']:.0f} s, features {p['feature_s']:.0f} s, metrics {p['metrics_s']:.0f} s)"
              for p in fid["projections"]]
    return lines
