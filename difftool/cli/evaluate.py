"""`difftool evaluate`: flags -> difftool.evaluation.evaluate / difftool.evaluation.sweep (or accelerate launch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from difftool.cli import options
from difftool.cli.errors import INTERRUPTED_EXIT, user_errors
from difftool.errors import UserError
from difftool.cli.launch import launch, worker_arguments
from difftool.models.sources import locate
from difftool.progress import say, show_notes
from difftool.threads import registered_early

stdout = Console()
EXAMPLES = """

Examples:

  difftool evaluate out/samples --reference cifar10                       # FID/KID/IS/PR of a folder or .npz

  difftool evaluate runs/cifar --reference cifar10 --num-samples 50000    # sample, then score

  difftool evaluate runs/cifar --reference ./real --sweep "ddim:10,20,50;dpm-solver:10,20"

  difftool stats ./real_images --output real.npz && difftool evaluate runs/x --reference real.npz
"""


@user_errors
@options.holds_quiet
@registered_early
def evaluate(
    source: Annotated[str, typer.Argument(help="Images (folder or samples .npz), a model (run folder, checkpoint, pipeline, .safetensors, hub id).")],
    reference: Annotated[str | None, typer.Option("--reference", "-r", help="Real images: a data set (cifar10, shapes, hub id), a folder, or statistics .npz from difftool stats.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, max=options.IMAGES_MAX, help="Samples to make from a model (FID papers use 50,000).")] = 10_000,
    sweep_spec: Annotated[str | None, typer.Option("--sweep", help='Scheduler x steps grid, e.g. "ddim:10,20,50;dpm-solver:10,20" (add ";guidance:1.5,2,3" to cross it with guidance scales): table, CSV, JSON and FID-vs-NFE plot.')] = None,
    scheduler: Annotated[str | None, typer.Option(help="Sampler for a model (difftool schedulers). Default: the run's recipe, else ddim.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps. Default: the recipe's, else the scheduler's recommended count.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call when sampling (per process).")] = 64,
    seed: Annotated[int, typer.Option(min=0, max=options.SEED_MAX, help="Sample i comes from (seed, i): every setting of a sweep sees the same noise.")] = 0,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance for class-conditional models.")] = None,
    guidance_rescale: options.GuidanceRescale = None,
    eta: options.Eta = None,
    weights: Annotated[str | None, typer.Option(help="ema or raw. Default: EMA where the model has it.")] = None,
    dtype: Annotated[str, typer.Option(help="Model precision when sampling: fp32, bf16, or fp16 (GPU).")] = "fp32",
    compile_model: options.Compile = False,
    features: options.Features = "inception",
    inception_weights: options.InceptionWeights = None,
    feature_batch_size: options.FeatureBatchSize = 100,
    kid_subset_size: Annotated[int, typer.Option(min=2, help="KID subset size (100 subsets; mean ± std).")] = 1000,
    pr_k: Annotated[int, typer.Option(min=1, help="Neighbours for precision/recall (Kynkäänniemi et al.).")] = 3,
    split: options.Split = "train",
    reference_images: options.ReferenceImages = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for metrics and samples (default evaluations/NAME).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier evaluation in --output.")] = False,
    resume: Annotated[bool, typer.Option(help="Reuse the samples of an earlier evaluation in --output; make only the missing ones.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    num_processes: options.NumProcesses = 1,
    main_process_port: options.MainProcessPort = None,
    quiet: options.Quiet = False,
) -> None:
    """Score images or a model: FID, KID, Inception Score, precision/recall; sweeps over schedulers and steps."""
    locate(source, give="a folder of images, a samples .npz or a model")  # before the model stack is imported
    from difftool.evaluation.evaluate import MetricOptions

    metric_options = MetricOptions(features=features, inception_weights=inception_weights,
                                   batch_size=feature_batch_size, kid_subset_size=kid_subset_size, pr_k=pr_k,
                                   split=split, reference_images=reference_images)
    if num_processes > 1:
        raise typer.Exit(launch("difftool.evaluate", worker_arguments(), num_processes=num_processes,
                                main_process_port=main_process_port, stopped_code=INTERRUPTED_EXIT))

    from difftool.evaluation.evaluate import default_output
    from difftool.output_rules import Existing
    from difftool.sampling.job import SampleRequest

    request = SampleRequest(num_images=num_samples, scheduler=scheduler, steps=steps, seed=seed, batch_size=batch_size,
                            eta=eta, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, weights=weights,
                            dtype=dtype, compile=compile_model)
    if sweep_spec is not None:
        _sweep(source, sweep_spec, reference, metric_options, request, output or default_output(source).with_name(default_output(source).name + "-sweep"),
               Existing(overwrite, resume), json_output)
        return
    _evaluate(source, reference, metric_options, request, output, Existing(overwrite, resume), json_output,
              sampling_options={"--scheduler": scheduler, "--steps": steps, "--eta": eta})


def _evaluate(source, reference, metric_options, request, output, existing, json_output, sampling_options) -> None:
    from difftool.evaluation.evaluate import evaluate
    from difftool.evaluation.imagesets import is_image_source

    given = [flag for flag, value in sampling_options.items() if value is not None]
    if is_image_source(source) and given:
        raise UserError(f"{source} holds images, not a model: {' and '.join(given)} do not apply")
    result = evaluate(source, reference=reference, options=metric_options, request=request, output=output,
                      existing=existing)
    if result is None:  # a non-main process of a multi-process run: it only sampled
        return
    show_notes(result.notes)
    if json_output:
        typer.echo(json.dumps(result.record, indent=2))
    else:
        _show_record(result.record)
    say(f"[green]done[/]: N = {result.record['num_images']} images; results in {result.output / 'metrics.json'}")


def _sweep(source, spec, reference, metric_options, request, output, existing, json_output) -> None:
    from difftool.evaluation.evaluate import COMPARABLE_N
    from difftool.evaluation.files import PLOT_FILE, RESULTS_CSV
    from difftool.evaluation.sweep import sweep

    rows = sweep(source, spec, reference=reference, options=metric_options, request=request, output=output,
                 existing=existing)
    if rows is None:
        return
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
    else:
        stdout.print(_sweep_table(rows))
    n = rows[0]["num_images"]
    if n < COMPARABLE_N:
        note = f"N = {n} samples per setting: FID is biased upwards below {COMPARABLE_N:,} and only comparable at equal N"
        show_notes([note])
    say(f"[green]done[/]: {len(rows)} settings; {output / RESULTS_CSV}, {output / PLOT_FILE}")


# The distance each feature network's evaluation records (evaluation.evaluate.distance_key), as it is called.
DISTANCES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "fd_judge": "FD_judge", "fd": "FD"}


def _sweep_table(rows: list[dict]) -> Table:
    """One line per setting; a judge's sweep shows its FD's noise and the class figures where Inception's has IS."""
    judged = any(row.get("right_class") is not None or row.get("fd_std") is not None for row in rows)
    extra = ("right class", "largest class") if judged else ("IS",)
    guided = any(row.get("guidance") is not None for row in rows)
    table = Table("scheduler", "steps", *(["guidance"] if guided else []), "NFE", rows[0]["distance"], "KID ×10³",
                  *extra, "img/s", caption=f"N = {rows[0]['num_images']} samples per setting")
    for row in rows:
        if judged:
            figures = [_share(row.get("right_class")), _share(row.get("largest_class_share"))]
            fd = f"{row['fd']:.2f}" if row.get("fd_std") is None else _pm(row["fd"], row["fd_std"])
        else:
            figures, fd = [_pm(row["is_mean"], row["is_std"])], f"{row['fd']:.2f}"
        table.add_row(row["scheduler"], str(row["steps"]), *([f"{row['guidance']:g}"] if guided else []),
                      str(row["nfe"]), fd,
                      _pm(row["kid_mean"], row["kid_std"], 1e3), *figures,
                      "-" if row["img_per_s"] is None else f"{row['img_per_s']:.2f}")
    return table


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _show_record(record: dict) -> None:
    table = Table("metric", "value", show_header=False, box=None)
    for key, name in DISTANCES.items():
        if key in record:
            noise = record.get(f"{key}_std")
            table.add_row(name, f"{record[key]:.3f}" if noise is None else f"{record[key]:.3f} ± {noise:.2g}")
    if "right_class" in record:
        table.add_row("right class", _share(record["right_class"]))
    if "largest_class_share" in record:
        table.add_row("largest class", _share(record["largest_class_share"]))
    if "kid_mean" in record:
        table.add_row("KID", _pm(record["kid_mean"], record["kid_std"]))
    if "is_mean" in record:
        table.add_row("Inception Score", _pm(record["is_mean"], record["is_std"]))
    if "precision" in record:
        table.add_row("precision / recall", f"{record['precision']:.3f} / {record['recall']:.3f}")
    table.add_row("images (N)", f"{record['num_images']:,} at {record['resolution']} px")
    if "reference" in record:
        table.add_row("reference", record["reference"])
    table.add_row("features", record["features"])
    stdout.print(table)


def _pm(mean: float | None, std: float | None, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.4g} ± {std * scale:.2g}"


evaluate.__doc__ = (evaluate.__doc__ or "") + EXAMPLES
