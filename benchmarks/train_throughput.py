"""Training throughput: `difftool train` against the training loop the diffusers documentation teaches.

    python benchmarks/train_throughput.py                       # quickstart model, batch 64
    python benchmarks/train_throughput.py --recipe cifar10 --batch-size 32
    python benchmarks/train_throughput.py --repeats 5 --steps 40 --no-record
    python benchmarks/train_throughput.py --recipe cifar10 --batch-size 128 \
        --implementations difftool,difftool-bf16,difftool-bf16-compile,plain-fp32,plain-bf16   # on a GPU

Both sides train the same UNet2DModel (the recipe's config) with the same noise schedule, on the
same images (the built-in shapes at the recipe's resolution, so it runs offline), with the same
global batch, AdamW and an EMA. The plain loop is written the way the diffusers tutorial and
`train_unconditional.py` write it: a `datasets` dataset with per-item PIL transforms
(`set_transform`), a DataLoader, `DDPMScheduler.add_noise`, MSE, `torch.optim.AdamW`,
diffusers' `EMAModel`, accelerate, and the loss read every step. torchvision is not installed
here, so its transforms (Resize, RandomHorizontalFlip, ToTensor, Normalize) are written out with
PIL and numpy, as cheap per item as torchvision's.

The plain loop runs twice: in fp32 (what it does on a CPU: the tutorial's `fp16` needs a GPU)
and with accelerate's bf16 autocast, so that the ratio shows what difftool adds beyond its
default precision. Steady state: the first `--warmup` steps are not timed. Runs alternate
between implementations; the figures are medians of `--repeats` runs, each in a fresh process.
A second batch size (twice the first) is run once per implementation for peak memory (on a GPU
the peak allocated GPU memory of each run is reported too). `--implementations` adds difftool
with one lever set (`difftool-bf16`, `difftool-bf16-compile`, ...) beside its default.
"""

from __future__ import annotations

import argparse
import json
import random
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

# difftool as users run it (the recipe and --set), or with these settings on top, to measure one lever.
DIFFTOOL = {
    "difftool": [],
    "difftool-fp32": ["train.mixed_precision=no"],
    "difftool-bf16": ["train.mixed_precision=bf16"],
    "difftool-compile": ["train.compile=true"],
    "difftool-bf16-compile": ["train.mixed_precision=bf16", "train.compile=true"],
}
PLAIN = {"plain-fp32": "no", "plain-bf16": "bf16"}  # the tutorial's loop and accelerate's mixed precision
IMPLEMENTATIONS = (*DIFFTOOL, *PLAIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart", help="quickstart or cifar10 (any recipe; its data becomes shapes)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for difftool's side only, to measure a lever (train.compile=true)")
    parser.add_argument("--implementations", default="difftool,plain-fp32,plain-bf16",
                        help=f"comma-separated, run in this order; the ratio column divides the first by each: "
                             f"{', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--no-double-batch", action="store_true",
                        help="skip the short run at twice the batch that measures how peak memory grows")
    add_output_options(parser)
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (difftool reports img/s per window of --warmup steps)")
    if args.worker:
        report(plain_worker(args, PLAIN[args.worker]) if args.worker in PLAIN else difftool_worker(args))
        return
    names = [name for name in args.implementations.split(",") if name]
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown or not names:
        parser.error(f"unknown implementations {unknown}; choose from {', '.join(IMPLEMENTATIONS)}")
    batch = args.batch_size or _config(args.recipe, None).train.batch_size
    common = ["--recipe", args.recipe, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    common += [item for override in args.set for item in ("--set", override)]
    runs: dict[str, list[dict]] = {name: [] for name in names}  # each worker's report, in order
    doubled: dict[str, dict] = {}
    failed: dict[str, str] = {}  # a failed implementation is not run again; the others go on
    figures = {"recipe": args.recipe, "batch_size": batch, "runs": runs, "double_batch": doubled, "failed": failed}
    for repeat in range(args.repeats):
        for name in [n for n in names if n not in failed]:
            result = run_or_note(failed, name, Path(__file__), ["--worker", name, "--batch-size", str(batch), *common])
            if result:
                runs[name].append(result)
                print(f"run {repeat + 1}/{args.repeats} {name}: {result['img_per_s']:.1f} img/s", flush=True)
            write_json(args.json, figures)
    if not args.no_double_batch:
        for name in [n for n in names if n not in failed]:  # memory growth with the batch: a short run at twice it
            short = [*common[:4], "--steps", str(args.warmup), *common[6:]]
            doubled[name] = run_worker(Path(__file__), ["--worker", name, "--batch-size", str(2 * batch), *short])
            write_json(args.json, figures)
    measured = [name for name in names if name not in failed]
    if not measured:
        sys.exit("every implementation failed: " + failures_note(failed))
    body, rows = _table(runs, doubled, batch, measured, args)
    body += failures_note(failed)
    command = f"python benchmarks/train_throughput.py --recipe {args.recipe} --batch-size {batch} " \
              f"--warmup {args.warmup} --steps {args.steps} --repeats {args.repeats}" + \
              "".join(f" --set {override}" for override in args.set) + \
              (f" --implementations {','.join(names)}" if names != ["difftool", "plain-fp32", "plain-bf16"] else "") + \
              (" --no-double-batch" if args.no_double_batch else "")
    publish(args, f"Training throughput, {args.recipe} model", command, body, {**figures, "rows": rows})
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def _computes_in(name: str, params, overrides: list[str]) -> tuple[str, str]:
    """The precision setting an implementation trains with, and the dtype its UNet computes in."""
    import torch

    from difftool import config as config_mod
    from difftool.training.setup import resolve_precision

    setting = PLAIN.get(name) or config_mod.apply_changes(params, [*overrides, *DIFFTOOL[name]]).train.mixed_precision
    resolved = resolve_precision(setting, not torch.cuda.is_available())
    return setting, "fp32" if resolved == "no" else "bf16"  # fp16 runs on the bf16 tensor cores: the same peak


def _table(runs: dict[str, list[dict]], doubled: dict[str, dict], batch: int, names: list[str], args):
    """The RESULTS.md table and note, and the same figures as JSON rows."""
    params = _config(args.recipe, batch)
    utilisation = Utilisation(_unet(params), training=True, peaks=args.peaks)
    speed = {name: median([r["img_per_s"] for r in runs[name]]) for name in names}
    gpu = all("peak_cuda_mib" in r for results in runs.values() for r in results)
    header = (f"| implementation | img/s (median) | runs | {names[0]} ÷ this | model FLOP/s (utilisation) "
              f"| peak RSS, batch {batch} |" + (f" peak RSS, batch {2 * batch} |" if doubled else "")
              + (f" peak GPU memory, batch {batch} |" if gpu else ""))
    lines, rows, settings = [header, "|---" * header.count(" |") + "|"], [], []
    for name in names:
        setting, dtype = _computes_in(name, params, args.set)
        rss = max(r["peak_rss_mib"] for r in runs[name])
        row = {"implementation": name, "img_per_s": speed[name], "runs": [r["img_per_s"] for r in runs[name]],
               "ratio": speed[names[0]] / speed[name], "precision": setting, "computes_in": dtype,
               "utilisation": utilisation.figures(speed[name], dtype), "peak_rss_mib": rss,
               "peak_rss_mib_double": doubled[name]["peak_rss_mib"] if name in doubled else None,
               "peak_cuda_mib": max(r["peak_cuda_mib"] for r in runs[name]) if gpu else None}
        rows.append(row)
        settings.append(f"`{name}` `{setting}` ({dtype})")
        runs_cell = ", ".join(f"{s:.1f}" for s in row["runs"])
        lines.append(f"| {name} | {speed[name]:.1f} | {runs_cell} | {row['ratio']:.2f}× | "
                     f"{utilisation.cell(speed[name], dtype)} | {rss:.0f} MiB |"
                     + (f" {row['peak_rss_mib_double']:.0f} MiB |" if doubled else "")
                     + (f" {row['peak_cuda_mib']:.0f} MiB |" if gpu else ""))
    note = (f"\n\nModel: the `{args.recipe}` recipe's UNet ({_parameters(params) / 1e6:.1f}M parameters, "
            f"{utilisation.flops_per_image / 1e9:.2f} GFLOP per image for forward and backward), "
            f"{params.data.resolution} px, global batch {batch}; {args.steps} timed steps after {args.warmup}; "
            f"precision (computes in): {', '.join(settings)}" + "".join(f", `{override}`" for override in args.set)
            + f". {utilisation.note()}")
    return "\n".join(lines) + note, rows


# ---------------------------------------------------------------- shared set-up


def _config(recipe: str, batch: int | None):
    from difftool import config as config_mod

    overrides = ["data.dataset=shapes"] + ([f"train.batch_size={batch}"] if batch else [])
    return config_mod.load_config(recipe, overrides)


def _unet(cfg):
    """The UNet both sides train (5 classes: the shapes)."""
    from difftool.models.build import build_unet

    return build_unet(cfg.model, resolution=cfg.data.resolution, channels=3, num_classes=5)


def _parameters(cfg) -> int:
    from difftool.models.build import count_parameters

    return count_parameters(_unet(cfg))


# ---------------------------------------------------------------- workers


def difftool_worker(args) -> dict:
    """`difftool train` as users run it, read back from its metrics.jsonl (img/s per window)."""
    from difftool import config as config_mod
    from difftool.training.loop import train

    cfg = _config(args.recipe, args.batch_size)
    total = args.warmup + args.steps
    cfg = config_mod.apply_changes(cfg, [f"train.max_steps={total}", f"log.every={args.warmup}",
                                         f"checkpoint.every={10 * total}", f"sample.every={10 * total}",
                                         "checkpoint.total_limit=1", "sample.num_images=1", "sample.steps=1",
                                         "eval.every=0", *args.set, *DIFFTOOL[args.worker]])
    # the final preview and checkpoint come after the timed windows; no evaluation (the quickstart's) at all
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    images = args.warmup * args.batch_size * len(timed)
    seconds = sum(args.warmup * args.batch_size / r["img_per_s"] for r in timed)
    return {"img_per_s": images / seconds}


def plain_worker(args, precision: str) -> dict:
    """The documented diffusers loop, step for step."""
    import datasets
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from PIL import Image, ImageOps

    from difftool.data import SHAPE_NAMES, make_shapes
    from difftool.models.build import build_noise_scheduler, build_unet

    cfg = _config(args.recipe, args.batch_size)
    size = cfg.data.resolution
    shapes = make_shapes(cfg.data.num_images, size)
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in shapes.images],
         "label": shapes.labels.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=SHAPE_NAMES)}))

    def preprocess(image: Image.Image) -> torch.Tensor:  # Resize, RandomHorizontalFlip, ToTensor, Normalize
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            image = ImageOps.mirror(image)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - 0.5) / 0.5

    def transform(examples):
        return {"images": [preprocess(image) for image in examples["image"]], "labels": examples["label"]}

    dataset.set_transform(transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = build_unet(cfg.model, resolution=size, channels=3, num_classes=len(SHAPE_NAMES))
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    total = args.warmup + args.steps
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                                   num_training_steps=total)
    ema = EMAModel(model.parameters(), decay=cfg.ema.max_decay, use_ema_warmup=True, inv_gamma=cfg.ema.inv_gamma,
                   power=cfg.ema.power, model_cls=type(model), model_config=model.config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema.to(accelerator.device)
    step, start = 0, None
    while step < total:
        for batch in loader:
            if step == args.warmup:
                start = time.perf_counter()
            clean = batch["images"]
            noise = torch.randn(clean.shape, device=clean.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device, dtype=torch.int64)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with accelerator.accumulate(model):
                labels = batch["labels"] if cfg.model.class_conditional else None
                pred = model(noisy, timesteps, class_labels=labels, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
            loss.detach().item()  # the tutorial logs the loss every step
            step += 1
            if step == total:
                break
    return {"img_per_s": args.steps * args.batch_size / (time.perf_counter() - start)}


if __name__ == "__main__":
    main()
