"""Sampling throughput: `difftool sample` against diffusers' pipelines on the same weights and steps.

    python benchmarks/sample_throughput.py                      # quickstart-size model, 64 images
    python benchmarks/sample_throughput.py --recipe cifar10 --num-images 16 --batch-size 16
    python benchmarks/sample_throughput.py --variants fp32,bf16 --repeats 5 --no-record

The model is the recipe's UNet, unconditional (the pipelines take no class labels), randomly
initialised with a fixed seed and saved as a diffusers pipeline folder: the arithmetic, not the
pictures, is what is timed. Two samplers: DDIM with 50 steps against `DDIMPipeline`, and
DPM-Solver++ 2M with 20 steps against `DDPMPipeline` with `DPMSolverMultistepScheduler`. The
pipelines get difftool's scheduler configuration (trailing timesteps, clipping) and one
generator per image seeded as difftool seeds them, so both sides compute the same images: the
largest per-pixel difference of the uint8 images is reported beside the speed.

difftool runs as `difftool sample` does (`difftool.generate`, writing samples.npz), in the
variants asked for: `fp32` (the default), `bf16` (`--dtype bf16`: faster where the CPU has
AVX512-BF16, different images), `compile` (`--compile`) and `bf16-compile` (both). A compile
variant makes one batch more in the same call, first: that batch pays for the compilation,
which is reported apart, and img/s is the steady state of the batches after it. Runs alternate; medians of `--repeats` fresh
processes; one run at twice the batch per implementation measures how peak memory grows. The
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
from common import Utilisation, append_results, median, report, run_worker

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
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
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
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.recipe, Path(tmp) / "model")
        utilisation = _utilisation(model)
        sections = [_bench_sampler(sampler, model, variants, args, Path(tmp), utilisation)
                    for sampler in args.samplers.split(",")]
    command = (f"python benchmarks/sample_throughput.py --recipe {args.recipe} --num-images {args.num_images} "
               f"--batch-size {args.batch_size} --repeats {args.repeats} --variants {args.variants} "
               f"--samplers {args.samplers}")
    body = "\n\n".join(sections) + (f"\n\nModel: the `{args.recipe}` recipe's UNet, unconditional, random weights "
                                    f"(seed {SEED}), {utilisation.flops_per_image / 1e9:.2f} GFLOP per model call "
                                    f"per image; {args.num_images} images in batches of {args.batch_size}. "
                                    f"{utilisation.note()}")
    if args.no_record:
        print(body)
    else:
        append_results(f"Sampling throughput, {args.recipe} model", command, body)


def _bench_sampler(sampler: str, model: Path, variants: list[str], args, tmp: Path,
                   utilisation: Utilisation) -> str:
    import numpy as np

    steps, pipeline_name = SAMPLERS[sampler]
    names = ["pipeline", *variants]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    extra: dict[str, dict] = {name: {} for name in names}
    base = ["--model", str(model), "--sampler", sampler, "--num-images", str(args.num_images)]
    for repeat in range(args.repeats):
        for name in names:
            out = tmp / f"{sampler}-{name}-{repeat}.npz"
            result = run_worker(Path(__file__), ["--worker", name, *base, "--batch-size", str(args.batch_size),
                                                 "--out", str(out)])
            speeds[name].append(result["img_per_s"])
            extra[name].update(rss=result["peak_rss_mib"], compile_s=result.get("compile_s"), images=out)
            print(f"{sampler} run {repeat + 1}/{args.repeats} {name}: {result['img_per_s']:.2f} img/s", flush=True)
    for name in names:
        out = tmp / f"{sampler}-{name}-double.npz"
        result = run_worker(Path(__file__), ["--worker", name, *base[:4], "--num-images", str(2 * args.batch_size),
                                             "--batch-size", str(2 * args.batch_size), "--out", str(out)])
        extra[name]["rss_double"] = result["peak_rss_mib"]
    reference = np.load(extra["pipeline"]["images"])["images"].astype(np.int16)
    pipe = median(speeds["pipeline"])
    header = (f"| implementation | img/s (median) | runs | ÷ pipeline | max pixel diff | model FLOP/s (utilisation) "
              f"| peak RSS, batch {args.batch_size} | peak RSS, batch {2 * args.batch_size} |")
    rows = [f"**{sampler}, {steps} steps** (against `{pipeline_name}`)", "", header, "|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = median(speeds[name])
        diff = int(np.abs(np.load(extra[name]["images"])["images"].astype(np.int16) - reference).max())
        label = name if name == "pipeline" else f"difftool {name}"
        if extra[name]["compile_s"]:
            label += f" (compiling: {extra[name]['compile_s']:.0f} s)"
        dtype = "bf16" if "bf16" in name else "fp32"
        rows.append(f"| {label} | {m:.2f} | {', '.join(f'{s:.2f}' for s in speeds[name])} | {m / pipe:.2f}× | {diff} | "
                    f"{utilisation.cell(m, dtype, calls_per_image=steps)} | "
                    f"{extra[name]['rss']:.0f} MiB | {extra[name]['rss_double']:.0f} MiB |")
    return "\n".join(rows)


# ---------------------------------------------------------------- the model


def make_model(recipe: str, folder: Path) -> Path:
    """The recipe's UNet, unconditional, seeded random weights, as a diffusers pipeline folder."""
    import torch
    from diffusers import DDPMPipeline

    from difftool import config as config_mod
    from difftool.models import build_noise_scheduler, build_unet

    cfg = config_mod.load_config(recipe, ["model.class_conditional=false"])
    torch.manual_seed(SEED)
    unet = build_unet(cfg.model, resolution=cfg.data.resolution, channels=3, num_classes=None)
    DDPMPipeline(unet=unet, scheduler=build_noise_scheduler(cfg.scheduler)).save_pretrained(folder)
    return folder


def _utilisation(model: Path) -> Utilisation:
    from diffusers import UNet2DModel

    return Utilisation(UNet2DModel.from_pretrained(model / "unet"), training=False)


# ---------------------------------------------------------------- workers


def difftool_worker(args) -> dict:
    """`difftool sample MODEL --scheduler S --steps N --format npz` through its library call.

    Each batch's computation is timed (as the pipeline's call is), not the writing of the files.
    """
    import numpy as np

    from difftool import generate as generate_module

    steps = SAMPLERS[args.sampler][0]
    compiling = "compile" in args.worker
    extra = args.batch_size if compiling else 0
    request = generate_module.SampleRequest(
        num_images=args.num_images + extra, scheduler=args.sampler, steps=steps, seed=SEED,
        batch_size=args.batch_size, dtype="bf16" if "bf16" in args.worker else "fp32", compile=compiling, format="npz")
    seconds: list[float] = []
    make_batch = generate_module._make_batch

    def timed_batch(*batch_args, **batch_kwargs):
        start = time.perf_counter()
        images = make_batch(*batch_args, **batch_kwargs)
        seconds.append(time.perf_counter() - start)
        return images

    generate_module._make_batch = timed_batch
    with tempfile.TemporaryDirectory() as tmp:
        generate_module.generate(args.model, request, Path(tmp) / "out", show_progress=False)
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

    from difftool.checkpoints import load_model
    from difftool.schedulers import make_scheduler

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
