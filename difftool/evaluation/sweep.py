"""Scheduler sweeps: for each scheduler × step count, sample (fixed seeds), score, time; one table, one plot.

`--sweep "ddim:10,20,50;dpm-solver:10,20;ddpm:1000"` samples the same seeds with every setting into
OUTPUT/samples/SCHEDULER-STEPS/ (so `--resume` reuses what is done), and writes results.csv,
results.json and fid_vs_nfe.png (one line per scheduler; the question a sweep answers is "how few
model calls for a given quality").
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

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
COLUMNS = ("scheduler", "steps", "nfe", "fd", "fd_std", *METRICS, "num_images", "seconds", "img_per_s")


def parse_sweep(spec: str) -> list[tuple[str, int]]:
    """"ddim:10,20;dpm-solver:20" -> [("ddim", 10), ("ddim", 20), ("dpm-solver", 20)], names checked."""
    settings: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, steps = part.partition(":")
        if not sep or not steps.strip():
            raise UserError(f"--sweep part '{part}' needs the form SCHEDULER:STEPS[,STEPS...] (e.g. ddim:10,20,50)")
        scheduler = get_spec(name.strip()).name
        for token in steps.split(","):
            token = token.strip()
            if not (token.isascii() and token.isdigit()) or int(token) < 1:  # int() refuses some digits: '²'
                raise UserError(f"--sweep step count '{token}' for {scheduler} is not a positive whole number")
            if (scheduler, int(token)) not in settings:
                settings.append((scheduler, int(token)))
    if not settings:
        raise UserError("--sweep is empty; give e.g. \"ddim:10,20,50;dpm-solver:10,20\"")
    return settings


@sharing_cores
def sweep(source: str, spec: str, *, reference: str | None, options: MetricOptions, request: SampleRequest,
          output: Path, existing: Existing = UNTOUCHED) -> list[dict] | None:
    """Sample and score every setting of `spec`; returns the rows (None in non-main processes)."""
    settings = parse_sweep(spec)
    if is_image_source(source):
        raise UserError(f"--sweep samples a model; {source} holds images")
    if reference is None:
        raise UserError("--sweep compares settings by FID: give --reference (a data set, folder or statistics .npz)")
    with evaluation_folder(output, {"the model": source, "the reference": reference}, existing):
        return _sweep_into(output, source, settings, reference, options, request, existing)


def _sweep_into(output: Path, source: str, settings: list[tuple[str, int]], reference: str, options: MetricOptions,
                request: SampleRequest, existing: Existing) -> list[dict] | None:
    requests = [dataclasses.replace(request, scheduler=scheduler, steps=steps) for scheduler, steps in settings]
    model = load_checked(source, requests)
    scorer = prepare_scorer(reference, options, model.info["resolution"])
    rows = []
    for (scheduler, steps), setting in zip(settings, requests, strict=True):
        folder = output / "samples" / f"{scheduler}-{steps}"
        done = sample_and_score(source, model, setting, folder, scorer, existing=existing)
        if done is None:  # a process that only samples
            continue
        sampled, record = done
        seconds, made = _timing(folder, sampled.seconds, sampled.made)
        key = distance_key(scorer.extractor)
        rows.append({"scheduler": scheduler, "steps": steps, "nfe": sampled.model_calls, "fd": record[key],
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
