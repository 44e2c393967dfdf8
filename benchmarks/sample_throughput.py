"""Sampling throughput: `difftool sample` against diffusers' pipelines on the same weights and steps.

    python benchmarks/sample_throughput.py                      # quickstart-size model, 64 images
    python benchmarks/sample_throughput.py --recipe cifar10 --num-images 16 --batch-size 16
    python benchmarks/sample_throughput.py --variants fp32,bf16 --repeats 5 --no-record
    python benchmarks/sample_throughput.py --recipe cifar10 --num-images 1024 --batch-size 1024 \
        --variants fp32,bf16,bf16-compile --no-double-batch                    # on a GPU

The model is the recipe's UNet, unconditional (the pipelines take no class labels), randomly
initialised with a fixed seed and saved as a diffusers pipeline folder: the arithmetic, not the
pictures, is what is timed. Two samplers: DDIM with 50 steps against `DDIMPipeline`, and
DPM-Solver++ 2M with 20 steps against `DDPMPipeline` with `DPMSolverMultistepScheduler`. The
pipelines get difftool's scheduler configuration (trailing timesteps, clipping) and one
generator per image seeded as difftool seeds them, so both sides compute the same images: the
largest per-pixel difference of the uint8 images is reported beside the speed.

difftool runs as `difftool sample` does (`difftool.sampling.job`, writing samples.npz), in the
variants asked for: `fp32` (the default), `bf16` (`--dtype bf16`: faster where the CPU has
AVX512-BF16, different images), `compile` (`--compile`) and `bf16-compile` (both). A compile
variant makes one batch more in the same call, first: that batch pays for the compilation,
which is reported apart, and img/s is the steady state of the batches after it. Runs alternate; medians of `--repeats` fresh
processes; one run at twice the batch per implementation measures how peak memory grows (on
a GPU each run also reports its peak allocated GPU memory). The
utilisation column is the model FLOPs per image (forward FLOPs times model calls) at the measured
speed, against the machine's attainable peak (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Utilisation,
    add_output_options,
    failures_note,
    median,
    publish,
    report,
    run_or_note,
    run_worker,
    write_json,
)

SAMPLERS = {"ddim": (50, "DDIMPipeline"), "dpm-solver": (20, "DDPMPipeline + DPMSolverMultistepScheduler")}
VARIANTS = ("fp32", "bf16", "compile", "bf16-compile")
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"difftool variants: {', '.join(VARIANTS)}")
    parser.add_argument("--samplers", default="ddim,dpm-solver")
    parser.add_argument("--no-double-batch", action="store_true",
                        help="skip the run at twice the batch that measures how peak memory grows")
    add_output_options(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # pipeline, or one of VARIANTS
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--sampler", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report(pipeline_worker(args) if args.worker == "pipeline" else difftool_worker(args))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    samplers = [s for s in args.samplers.split(",") if s]
    if set(samplers) - set(SAMPLERS) or not samplers:
        parser.error(f"unknown samplers in '{args.samplers}'; choose from {', '.join(SAMPLERS)}")
    figures: dict = {"recipe": args.recipe, "batch_size": args.batch_size, "num_images": args.num_images,
                     "runs": {}, "rows": {}, "failed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.recipe, Path(tmp) / "model")
        utilisation = _utilisation(model, args.peaks)
        sections = [_bench_sampler(sampler, model, variants, args, Path(tmp), utilisation, figures)
                    for sampler in samplers]
    command = (f"python benchmarks/sample_throughput.py --recipe {args.recipe} --num-images {args.num_images} "
               f"--batch-size {args.batch_size} --repeats {args.repeats} --variants {args.variants} "
               f"--samplers {args.samplers}" + (" --no-double-batch" if args.no_double_batch else ""))
    body = "\n\n".join(sections) + (f"\n\nModel: the `{args.recipe}` recipe's UNet, unconditional, random weights "
                                    f"(seed {SEED}), {utilisation.flops_per_image / 1e9:.2f} GFLOP per model call "
                                    f"per image; {args.num_images} images in batches of {args.batch_size}. "
                                    f"{utilisation.note()}")
    publish(args, f"Sampling throughput, {args.recipe} model", command, body,
            {**figures, "flops_per_image": utilisation.flops_per_image})
    if any(figures["failed"].values()):
        sys.exit("failed: " + ", ".join(f"{sampler} {name}" for sampler, names in figures["failed"].items()
                                         for name in names))


def _bench_sampler(sampler: str, model: Path, variants: list[str], args, tmp: Path,
                   utilisation: Utilisation, figures: dict) -> str:
    """One sampler's runs and table; `figures` (written to --json as runs finish) gets its runs and rows."""
    import numpy as np

    steps, pipeline_name = SAMPLERS[sampler]
    runs: dict[str, list[dict]] = figures["runs"].setdefault(sampler, {name: [] for name in ["pipeline", *variants]})
    failed: dict[str, str] = figures.setdefault("failed", {}).setdefault(sampler, {})  # the pipeline's is fatal
    images: dict[str, Path] = {}
    doubled: dict[str, dict] = {}
    base = ["--model", str(model), "--sampler", sampler, "--num-images", str(args.num_images)]
    for repeat in range(args.repeats):
        for name in [n for n in runs if n not in failed]:
            images[name] = tmp / f"{sampler}-{name}-{repeat}.npz"
            worker = ["--worker", name, *base, "--batch-size", str(args.batch_size), "--out", str(images[name])]
            result = run_worker(Path(__file__), worker) if name == "pipeline" else \
                run_or_note(failed, name, Path(__file__), worker)
            if result:
                runs[name].append(result)
                print(f"{sampler} run {repeat + 1}/{args.repeats} {name}: {result['img_per_s']:.2f} img/s", flush=True)
            write_json(args.json, figures)
    names = [name for name in runs if name not in failed]
    if not args.no_double_batch:
        for name in names:
            out = tmp / f"{sampler}-{name}-double.npz"
            doubled[name] = run_worker(Path(__file__), ["--worker", name, *base[:4], "--num-images",
                                                        str(2 * args.batch_size), "--batch-size",
                                                        str(2 * args.batch_size), "--out", str(out)])
    reference = np.load(images["pipeline"])["images"].astype(np.int16)
    speed = {name: median([r["img_per_s"] for r in runs[name]]) for name in names}
    gpu = all("peak_cuda_mib" in r for name in names for r in runs[name])
    header = (f"| implementation | img/s (median) | runs | ÷ pipeline | max pixel diff | model FLOP/s (utilisation) "
              f"| peak RSS, batch {args.batch_size} |" + (f" peak RSS, batch {2 * args.batch_size} |" if doubled else "")
              + (f" peak GPU memory, batch {args.batch_size} |" if gpu else ""))
    lines = [f"**{sampler}, {steps} steps** (against `{pipeline_name}`)", "", header, "|---" * header.count(" |") + "|"]
    rows = figures["rows"][sampler] = []
    for name in names:
        dtype = "bf16" if "bf16" in name else "fp32"
        compile_s = next((r["compile_s"] for r in runs[name] if r.get("compile_s")), None)
        row = {"implementation": name, "steps": steps, "img_per_s": speed[name],
               "runs": [r["img_per_s"] for r in runs[name]], "ratio": speed[name] / speed["pipeline"],
               "max_pixel_diff": int(np.abs(np.load(images[name])["images"].astype(np.int16) - reference).max()),
               "compile_s": compile_s, "computes_in": dtype,
               "utilisation": utilisation.figures(speed[name], dtype, calls_per_image=steps),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[name]),
               "peak_rss_mib_double": doubled[name]["peak_rss_mib"] if name in doubled else None,
               "peak_cuda_mib": max(r["peak_cuda_mib"] for r in runs[name]) if gpu else None}
        rows.append(row)
        label = name if name == "pipeline" else f"difftool {name}"
        if compile_s:
            label += f" (compiling: {compile_s:.0f} s)"
        lines.append(f"| {label} | {row['img_per_s']:.2f} | {', '.join(f'{s:.2f}' for s in row['runs'])} | "
                     f"{row['ratio']:.2f}× | {row['max_pixel_diff']} | "
                     f"{utilisation.cell(speed[name], dtype, calls_per_image=steps)} | {row['peak_rss_mib']:.0f} MiB |"
                     + (f" {row['peak_rss_mib_double']:.0f} MiB |" if doubled else "")
                     + (f" {row['peak_cuda_mib']:.0f} MiB |" if gpu else ""))
    write_json(args.json, figures)
    return "\n".join(lines) + ("\n\n" + failures_note(failed).strip() if failed else "")


# ---------------------------------------------------------------- the model


def make_model(recipe: str, folder: Path) -> Path:
    """The recipe's UNet, unconditional, seeded random weights, as a diffusers pipeline folder."""
    import torch
    from diffusers import DDPMPipeline

    from difftool import config as config_mod
    from difftool.models.build import build_noise_scheduler, build_unet

    cfg = config_mod.load_config(recipe, ["model.class_conditional=false"])
    torch.manual_seed(SEED)
    unet = build_unet(cfg.model, resolution=cfg.data.resolution, channels=3, num_classes=None)
    DDPMPipeline(unet=unet, scheduler=build_noise_scheduler(cfg.scheduler)).save_pretrained(folder)
    return folder


def _utilisation(model: Path, peaks: str | None) -> Utilisation:
    from diffusers import UNet2DModel

    return Utilisation(UNet2DModel.from_pretrained(model / "unet"), training=False, peaks=peaks)


# ---------------------------------------------------------------- workers


def difftool_worker(args) -> dict:
    """`difftool sample MODEL --scheduler S --steps N --format npz` through its library call.

    Each batch's computation is timed (as the pipeline's call is), not the writing of the files.
    """
    import numpy as np

    from difftool.sampling import job as generate_module

    steps = SAMPLERS[args.sampler][0]
    compiling = "compile" in args.worker
    extra = args.batch_size if compiling else 0
    request = generate_module.SampleRequest(
        num_images=args.num_images + extra, scheduler=args.sampler, steps=steps, seed=SEED,
        batch_size=args.batch_size, dtype="bf16" if "bf16" in args.worker else "fp32", compile=compiling, format="npz")
    seconds: list[float] = []
    make_batch = generate_module.sample_batch

    def timed_batch(*batch_args, **batch_kwargs):
        start = time.perf_counter()
        images = make_batch(*batch_args, **batch_kwargs)
        seconds.append(time.perf_counter() - start)
        return images

    generate_module.sample_batch = timed_batch
    with tempfile.TemporaryDirectory() as tmp:
        generate_module.generate(args.model, request, Path(tmp) / "out")
        with np.load(Path(tmp) / "out" / "samples.npz") as npz:
            np.savez(args.out, images=npz["arr_0"][: args.num_images])  # the same indices as the pipeline's
    timed = seconds[1:] if compiling else seconds
    compile_s = seconds[0] - sum(timed) / len(timed) if compiling else None
    return {"img_per_s": args.num_images / sum(timed), "compile_s": compile_s}


def pipeline_worker(args) -> dict:
    """The diffusers pipeline, configured like difftool's sampler so the images can be compared."""
    import numpy as np
    import torch
    from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel

    from difftool.models.load import load_model
    from difftool.sampling.schedulers import make_scheduler

    steps = SAMPLERS[args.sampler][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where difftool samples too
    unet = UNet2DModel.from_pretrained(Path(args.model) / "unet").eval().to(device)
    scheduler = make_scheduler(args.sampler, load_model(args.model).scheduler_config, steps=steps)
    images, seconds = [], 0.0
    for first in range(0, args.num_images, args.batch_size):
        indices = range(first, min(first + args.batch_size, args.num_images))
        generators = [torch.Generator().manual_seed(SEED * 1_000_003 + i) for i in indices]
        start = time.perf_counter()
        if args.sampler == "ddim":
            pipe = DDIMPipeline(unet=unet, scheduler=scheduler).to(device)
            pipe.set_progress_bar_config(disable=True)
            out = pipe(batch_size=len(indices), generator=generators, eta=0.0, num_inference_steps=steps,
                       use_clipped_model_output=True, output_type="np").images
        else:
            pipe = DDPMPipeline(unet=unet, scheduler=scheduler).to(device)
            pipe.set_progress_bar_config(disable=True)
            out = pipe(batch_size=len(indices), generator=generators, num_inference_steps=steps,
                       output_type="np").images
        seconds += time.perf_counter() - start
        images.append(np.round(out * 255).astype(np.uint8))
    np.savez(args.out, images=np.concatenate(images))
    return {"img_per_s": args.num_images / seconds}


if __name__ == "__main__":
    main()
