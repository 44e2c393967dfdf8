"""Scheduler sweeps: for each scheduler × step count, sample (fixed seeds), score, time; one table, one plot.

`--sweep "ddim:10,20,50;dpm-solver:10,20;ddpm:1000"` samples the same seeds with every setting into
OUTPUT/samples/SCHEDULER-STEPS/ (so `--resume` reuses what is done), and writes results.csv,
results.json and fid_vs_nfe.png (one line per scheduler; the question a sweep answers is "how few
model calls for a given quality"). A `guidance:1.5,2,3` part crosses every setting with those guidance scales
(OUTPUT/samples/SCHEDULER-STEPS-gSCALE/): the best scale differs between data sets, and a distilled student
bakes one in.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import NamedTuple

from difftool.errors import UserError
from difftool.output_rules import UNTOUCHED, Existing
from difftool.evaluation.evaluate import (
    MetricOptions,
    distance_key,
    evaluation_folder,
    load_checked,
    prepare_scorer,
    sample_and_score,
)
from difftool.evaluation.files import PLOT_FILE, RESULTS_CSV, RESULTS_JSON, TIMING_FILE
from difftool.evaluation.imagesets import is_image_source
from difftool.evaluation.plots import fd_vs_nfe_figure
from difftool.safeio import atomic_path, write_text
from difftool.sampling.job import SampleRequest
from difftool.sampling.schedulers import get_spec
from difftool.threads import sharing_cores

# A judge's evaluation has its FD's noise and class figures (evaluation/judge.py) where Inception has its score.
METRICS = ("kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "right_class", "largest_class_share")
COLUMNS = ("scheduler", "steps", "guidance", "nfe", "fd", "fd_std", *METRICS, "num_images", "seconds", "img_per_s")


class Setting(NamedTuple):
    """One point of a sweep."""

    scheduler: str
    steps: int
    guidance: float | None = None  # None: --guidance-scale, else the model's default


def parse_sweep(spec: str) -> list[Setting]:
    """"ddim:10,20;dpm-solver:20" -> ddim 10, ddim 20, dpm-solver 20 (names checked); a "guidance:2,3" part
    gives each of those at every scale listed."""
    pairs: list[tuple[str, int]] = []
    scales: list[float] = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, values = part.partition(":")
        if not sep or not values.strip():
            raise UserError(f"--sweep part '{part}' needs the form SCHEDULER:STEPS[,STEPS...] (e.g. ddim:10,20,50) "
                            f"or guidance:SCALE[,SCALE...]")
        if name.strip() == "guidance":
            scales += [s for s in map(_scale, values.split(",")) if s not in scales]
            continue
        scheduler = get_spec(name.strip()).name
        for token in values.split(","):
            token = token.strip()
            if not (token.isascii() and token.isdigit()) or int(token) < 1:  # int() refuses some digits: '²'
                raise UserError(f"--sweep step count '{token}' for {scheduler} is not a positive whole number")
            if (scheduler, int(token)) not in pairs:
                pairs.append((scheduler, int(token)))
    if not pairs:
        raise UserError("--sweep has no scheduler; give e.g. \"ddim:10,20,50;dpm-solver:10,20\"")
    return [Setting(scheduler, steps, scale) for scheduler, steps in pairs for scale in scales or [None]]


def _scale(token: str) -> float:
    try:
        scale = float(token.strip()) if token.strip().isascii() else math.nan
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"--sweep guidance scale '{token.strip()}' is not a number of at least 0 (1: no guidance)")
    return scale


def setting_name(setting: Setting) -> str:
    """The setting's folder under OUTPUT/samples/."""
    name = f"{setting.scheduler}-{setting.steps}"
    return name if setting.guidance is None else f"{name}-g{setting.guidance:g}"


@sharing_cores
def sweep(source: str, spec: str, *, reference: str | None, options: MetricOptions, request: SampleRequest,
          output: Path, existing: Existing = UNTOUCHED) -> list[dict] | None:
    """Sample and score every setting of `spec`; returns the rows (None in non-main processes)."""
    settings = parse_sweep(spec)
    if is_image_source(source):
        raise UserError(f"--sweep samples a model; {source} holds images")
    if reference is None:
        raise UserError("--sweep compares settings by FID: give --reference (a data set, folder or statistics .npz)")
    if request.guidance_scale is not None and any(s.guidance is not None for s in settings):
        raise UserError("give the guidance scales either in --sweep's guidance: part or with --guidance-scale, "
                        "not both")
    with evaluation_folder(output, {"the model": source, "the reference": reference}, existing):
        return _sweep_into(output, source, settings, reference, options, request, existing)


def _sweep_into(output: Path, source: str, settings: list[Setting], reference: str, options: MetricOptions,
                request: SampleRequest, existing: Existing) -> list[dict] | None:
    requests = [dataclasses.replace(request, scheduler=s.scheduler, steps=s.steps,
                                    guidance_scale=request.guidance_scale if s.guidance is None else s.guidance)
                for s in settings]
    model = load_checked(source, requests)
    scorer = prepare_scorer(reference, options, model.info["resolution"])
    rows = []
    for chosen, setting in zip(settings, requests, strict=True):
        folder = output / "samples" / setting_name(chosen)
        done = sample_and_score(source, model, setting, folder, scorer, existing=existing)
        if done is None:  # a process that only samples
            continue
        sampled, record = done
        seconds, made = _timing(folder, sampled.seconds, sampled.made)
        key = distance_key(scorer.extractor)
        rows.append({**chosen._asdict(), "nfe": sampled.model_calls, "fd": record[key],
                     "fd_std": record.get(f"{key}_std"), **{k: record.get(k) for k in METRICS},
                     "num_images": record["num_images"], "seconds": seconds,
                     "img_per_s": made / seconds if seconds else None, "distance": scorer.extractor.distance_name})
    if scorer is None:
        return None
    _write_results(output, rows, scorer.extractor.distance_name,
                   {"source": source, "reference": scorer.reference.source, "features": scorer.extractor.name})
    return rows


def _timing(folder: Path, seconds: float, made: int) -> tuple[float | None, int]:
    """Sampling time of a setting; a resumed setting adds its new images to what the earlier run took."""
    path = folder / TIMING_FILE
    before = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "made": 0}
    total = {"seconds": before["seconds"] + seconds, "made": before["made"] + made}
    write_text(path, json.dumps(total) + "\n")
    return (total["seconds"] or None), total["made"]


def _write_results(output: Path, rows: list[dict], distance_name: str, about: dict) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text(output / RESULTS_CSV, table.getvalue())
    write_text(output / RESULTS_JSON, json.dumps({**about, "distance": distance_name, "rows": rows}, indent=2) + "\n")
    plot_fd_vs_nfe(rows, output / PLOT_FILE, distance_name)


def plot_fd_vs_nfe(rows: list[dict], path: Path, distance_name: str = "FID") -> None:
    """The sweep's figure (`fd_vs_nfe_figure`) as a PNG file at `path`."""
    with atomic_path(path) as tmp:
        fd_vs_nfe_figure(rows, distance_name).savefig(tmp, format="png")
