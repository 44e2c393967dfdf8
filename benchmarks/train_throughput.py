"""Training throughput: `difftool train` against the training loop the diffusers documentation teaches.

    python benchmarks/train_throughput.py                       # quickstart model, batch 64
    python benchmarks/train_throughput.py --recipe cifar10 --batch-size 32
    python benchmarks/train_throughput.py --repeats 5 --steps 40 --no-record

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
A second batch size (twice the first) is run once per implementation for peak memory.
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
from common import Utilisation, append_results, median, report, run_worker

IMPLEMENTATIONS = ("difftool", "plain-fp32", "plain-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart", help="quickstart or cifar10 (any recipe; its data becomes shapes)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for difftool's side only, to measure a lever (train.compile=true)")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (difftool reports img/s per window of --warmup steps)")
    if args.worker:
        report(WORKERS[args.worker](args))
        return
    batch = args.batch_size or _config(args.recipe, None).train.batch_size
    common = ["--recipe", args.recipe, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    common += [item for override in args.set for item in ("--set", override)]
    speeds: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    memory: dict[str, dict[int, float]] = {name: {} for name in IMPLEMENTATIONS}
    for repeat in range(args.repeats):
        for name in IMPLEMENTATIONS:
            result = run_worker(Path(__file__), ["--worker", name, "--batch-size", str(batch), *common])
            speeds[name].append(result["img_per_s"])
            memory[name][batch] = max(memory[name].get(batch, 0), result["peak_rss_mib"])
            print(f"run {repeat + 1}/{args.repeats} {name}: {result['img_per_s']:.1f} img/s", flush=True)
    for name in IMPLEMENTATIONS:  # memory growth with the batch: one short run at twice the batch
        short = [*common[:4], "--steps", str(args.warmup), *common[6:]]
        result = run_worker(Path(__file__), ["--worker", name, "--batch-size", str(2 * batch), *short])
        memory[name][2 * batch] = result["peak_rss_mib"]
    body = _table(speeds, memory, batch, args)
    command = f"python benchmarks/train_throughput.py --recipe {args.recipe} --batch-size {batch} " \
              f"--warmup {args.warmup} --steps {args.steps} --repeats {args.repeats}" + \
              "".join(f" --set {override}" for override in args.set)
    if args.no_record:
        print(body)
    else:
        append_results(f"Training throughput, {args.recipe} model", command, body)


def _table(speeds, memory, batch, args) -> str:
    import torch

    from difftool import config as config_mod
    from difftool.train import resolve_precision

    params = _config(args.recipe, batch)
    ours = config_mod.apply_changes(params, args.set).train.mixed_precision
    computes_in = {"difftool": "bf16" if resolve_precision(ours, not torch.cuda.is_available()) == "bf16" else "fp32",
                   "plain-fp32": "fp32", "plain-bf16": "bf16"}
    utilisation = Utilisation(_unet(params), training=True)
    ours_speed = median(speeds["difftool"])
    header = (f"| implementation | img/s (median) | runs | difftool ÷ this | model FLOP/s (utilisation) "
              f"| peak RSS, batch {batch} | peak RSS, batch {2 * batch} |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for name in IMPLEMENTATIONS:
        m = median(speeds[name])
        runs = ", ".join(f"{s:.1f}" for s in speeds[name])
        rows.append(f"| {name} | {m:.1f} | {runs} | {ours_speed / m:.2f}× | "
                    f"{utilisation.cell(m, computes_in[name])} | {memory[name][batch]:.0f} MiB | "
                    f"{memory[name][2 * batch]:.0f} MiB |")
    return "\n".join(rows) + (f"\n\nModel: the `{args.recipe}` recipe's UNet "
                              f"({_parameters(params) / 1e6:.1f}M parameters, {utilisation.flops_per_image / 1e9:.2f} GFLOP per image for "
                              f"forward and backward), {params.data.resolution} px, global batch {batch}; "
                              f"{args.steps} timed steps after {args.warmup}; difftool precision `{ours}` "
                              f"(computes in {computes_in['difftool']})"
                              + "".join(f", `{override}`" for override in args.set) + f". {utilisation.note()}")


# ---------------------------------------------------------------- shared set-up


def _config(recipe: str, batch: int | None):
    from difftool import config as config_mod

    overrides = ["data.dataset=shapes"] + ([f"train.batch_size={batch}"] if batch else [])
    return config_mod.load_config(recipe, overrides)


def _unet(cfg):
    """The UNet both sides train (5 classes: the shapes)."""
    from difftool.models import build_unet

    return build_unet(cfg.model, resolution=cfg.data.resolution, channels=3, num_classes=5)


def _parameters(cfg) -> int:
    from difftool.models import count_parameters

    return count_parameters(_unet(cfg))


# ---------------------------------------------------------------- workers


def difftool_worker(args) -> dict:
    """`difftool train` as users run it, read back from its metrics.jsonl (img/s per window)."""
    from difftool import config as config_mod
    from difftool.train import train

    cfg = _config(args.recipe, args.batch_size)
    total = args.warmup + args.steps
    cfg = config_mod.apply_changes(cfg, [f"train.max_steps={total}", f"log.every={args.warmup}",
                                         f"checkpoint.every={10 * total}", f"sample.every={10 * total}",
                                         "checkpoint.total_limit=1", "sample.num_images=1", "sample.steps=1",
                                         *args.set])  # the final preview and checkpoint come after the timed windows
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", show_progress=False)
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
    from difftool.models import build_noise_scheduler, build_unet

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


WORKERS = {
    "difftool": difftool_worker,
    "plain-fp32": lambda args: plain_worker(args, "no"),
    "plain-bf16": lambda args: plain_worker(args, "bf16"),
}

if __name__ == "__main__":
    main()
