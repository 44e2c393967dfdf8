"""How long a 50,000-sample FID evaluation takes on this machine: sampling, the feature pass, the metrics.

    python benchmarks/sample_throughput.py --recipe cifar10 --num-images 1024 --batch-size 1024 --json s.json
    python benchmarks/fid_projection.py --sampling s.json              # then this

`difftool evaluate RUN --reference cifar10 --num-samples 50000` samples the model, runs the FID
Inception network over the samples (twice per batch: features, then class probabilities) and
scores them against cached reference statistics. The sampling rate comes from a
sample_throughput.py JSON (`--sampling`, its `--sampler` rows: DDIM-50 is the cifar10 recipe's);
the other two parts are timed here as difftool runs them:

- the feature pass: `difftool.evaluation.features.extract` with `load_extractor("inception",
  inception_weights=FILE)`, FILE a TorchScript stand-in with the FID Inception file's interface
  and about its cost (Inception-v3 is 5.7 GMAC, 11.4 GFLOP, per 299-px image by torchvision's
  model table; the stand-in's own count is reported), as the real weights cannot be downloaded
  everywhere; timed over `--feature-images` random 32-px images in evaluate's batches of 100;
- the metrics: `difftool.evaluate.score` on `--metric-images` feature rows (random, `--dims` wide:
  2048 is Inception's pool3) against a reference of as many: FID, KID, precision/recall and the
  Inception Score, as evaluate computes them; the features are replayed from memory there.

Projected time = N / sampling rate + compiling (once) + N / feature rate + the metrics. Loading the
model and the reference statistics (cached after their first use) are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, publish

GOAL_S = 600  # issue 18: a 50,000-sample FID of the cifar10 model in at most 10 minutes on one H200
INCEPTION_GFLOP = 11.4


class InceptionStandIn(torch.nn.Module):
    """uint8 N×3×H×W, resized to `size` px, through convolutions of about Inception-v3's FLOPs at 299 px.

    The interface is the FID Inception TorchScript file's (difftool.evaluation.features.InceptionExtractor): pool
    features (2048) with `return_features`, else 1008 class probabilities, with or without the bias.
    """

    def __init__(self, size: int = 299):
        super().__init__()
        self.size = size
        widths, strides = (3, 64, 128, 192, 512, 1024), (2, 2, 1, 2, 2)
        layers: list[torch.nn.Module] = []
        for c_in, c_out, stride in zip(widths, widths[1:], strides, strict=False):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, padding=1), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.Conv2d(widths[-1], 2048, 1), torch.nn.ReLU())
        self.head = torch.nn.Linear(2048, 1008, bias=False)
        self.register_buffer("bias", torch.zeros(1008))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(self.size, self.size), mode="bilinear", align_corners=False) / 127.5 - 1
        features = self.body(x).mean(dim=(2, 3))
        if return_features:
            return features
        logits = self.head(features)
        return torch.softmax(logits if no_output_bias else logits + self.bias, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=50_000, help="the evaluation projected")
    parser.add_argument("--sampling", action="append", default=[], metavar="FILE",
                        help="a sample_throughput.py --json file (repeatable; a missing file is reported, not fatal)")
    parser.add_argument("--sampler", default="ddim", help="whose rows give the sampling rate")
    parser.add_argument("--feature-images", type=int, default=5000, help="images the feature pass is timed on")
    parser.add_argument("--feature-batch-size", type=int, default=100, help="evaluate's --feature-batch-size")
    parser.add_argument("--stand-in-size", type=int, default=299, help="the stand-in's input size (299: Inception's)")
    parser.add_argument("--metric-images", type=int, help="feature rows the metrics are timed on (default: --num-samples)")
    parser.add_argument("--dims", type=int, default=2048, help="feature width for the metrics")
    add_output_options(parser)  # --peaks is accepted for symmetry and unused
    args = parser.parse_args()
    metric_images = args.metric_images or args.num_samples
    features = time_feature_pass(args.feature_images, args.feature_batch_size, args.stand_in_size)
    print(f"feature pass: {features['img_per_s']:.0f} img/s on {features['device']}", flush=True)
    metrics = time_metrics(metric_images, args.dims)
    print(f"metrics on {metric_images} × {args.dims} features: {metrics['seconds']:.1f} s", flush=True)
    sampling, missing = sampling_rows(args.sampling, args.sampler)
    projections = [project(row, args.num_samples, features, metrics) for row in sampling]
    body = table(projections, args, features, metrics, metric_images, missing)
    command = (f"python benchmarks/fid_projection.py --num-samples {args.num_samples} --feature-images "
               f"{args.feature_images} --stand-in-size {args.stand_in_size} --metric-images {metric_images} "
               f"--dims {args.dims} --sampler {args.sampler}"
               + "".join(f" --sampling {Path(s).name}" for s in args.sampling))  # the runs they hold: under the table
    publish(args, f"FID-{args.num_samples // 1000}k projection", command, body,
            {"num_samples": args.num_samples, "goal_s": GOAL_S, "feature_pass": features, "metrics": metrics,
             "projections": projections, "missing_sampling": missing})


def time_feature_pass(count: int, batch_size: int, size: int) -> dict:
    """img/s of difftool's Inception feature pass (both calls per batch) with the stand-in network."""
    from torch.utils.flop_counter import FlopCounterMode

    from difftool.evaluation.features import extract, load_extractor

    net = InceptionStandIn(size).eval()
    one = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(one, return_features=True)
        net(one, no_output_bias=True)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception-stand-in.pt"
        torch.jit.save(torch.jit.script(net), str(path))
        extractor = load_extractor("inception", inception_weights=path)
    extract(extractor, [images[:batch_size]])  # first-call costs: cuDNN's algorithm search, lazy initialisation
    start = time.perf_counter()
    extract(extractor, (images[i : i + batch_size] for i in range(0, count, batch_size)))  # returns on the host
    seconds = time.perf_counter() - start
    return {"img_per_s": count / seconds, "seconds": seconds, "images": count, "batch_size": batch_size,
            "stand_in_size": size, "gflop_per_image": counter.get_total_flops() / 1e9,
            "device": str(extractor.device)}


def time_metrics(count: int, dims: int) -> dict:
    """Seconds of difftool.evaluate.score's metrics on `count` random feature rows against as many."""
    import numpy as np

    from difftool.evaluation.evaluate import MetricOptions, score
    from difftool.evaluation.features import Extractor
    from difftool.evaluation.imagesets import from_tensor
    from difftool.evaluation.metrics import gaussian_stats
    from difftool.evaluation.reference import Reference

    rng = np.random.default_rng(0)
    real = rng.standard_normal((count, dims), dtype=np.float32)
    fake = rng.standard_normal((count, dims), dtype=np.float32) + np.float32(0.1)
    logits = rng.standard_normal((count, 1008))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    class Replay(Extractor):
        """The rows of `fake` and `probs` in order, as if a network had just computed them."""

        name, distance_name = "replay", "FID"

        def __init__(self):
            super().__init__(torch.nn.Identity(), torch.device("cpu"))
            self.done = 0

        def _run(self, images):
            rows = slice(self.done, self.done + len(images))
            self.done = rows.stop
            return torch.from_numpy(fake[rows]), torch.from_numpy(probs[rows])

    reference = Reference(gaussian_stats(real), real, Replay.name, 32, "random features")  # cached in real use
    images = from_tensor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8).expand(count, -1, -1, -1), "replayed")
    start = time.perf_counter()
    record = score(images, reference, Replay(), MetricOptions())
    return {"seconds": time.perf_counter() - start, "images": count, "dims": dims,
            "computed": sorted(k for k in record if k in ("fid", "kid_mean", "precision", "recall", "is_mean"))}


def sampling_rows(files: list[str], sampler: str) -> tuple[list[dict], list[str]]:
    """The sampler's rows of each sample_throughput.py JSON that exists, and the files that do not."""
    rows, missing = [], []
    for name in files:
        path = Path(name)
        if not path.is_file():
            missing.append(name)
            continue
        figures = json.loads(path.read_text())
        rows += [{**row, "batch_size": figures["batch_size"], "source": figures.get("command", name)}
                 for row in figures.get("rows", {}).get(sampler, [])]
    return rows, missing


def project(row: dict, num_samples: int, features: dict, metrics: dict) -> dict:
    sampling_s = num_samples / row["img_per_s"] + (row.get("compile_s") or 0)
    feature_s = num_samples / features["img_per_s"]
    return {"implementation": row["implementation"], "batch_size": row["batch_size"], "steps": row["steps"],
            "img_per_s": row["img_per_s"], "compile_s": row.get("compile_s"), "sampling_s": sampling_s,
            "feature_s": feature_s, "metrics_s": metrics["seconds"], "source": row["source"],
            "total_s": sampling_s + feature_s + metrics["seconds"]}


def table(projections: list[dict], args, features: dict, metrics: dict, metric_images: int, missing: list[str]) -> str:
    n = f"{args.num_samples:,}"
    lines = [f"| sampling ({args.sampler}) | batch | img/s | sampling {n} | feature pass | metrics | total | "
             f"≤ {GOAL_S // 60} min |", "|---|---|---|---|---|---|---|---|"]
    for p in projections:
        label = p["implementation"] if p["implementation"] == "pipeline" else f"difftool {p['implementation']}"
        lines.append(f"| {label} | {p['batch_size']} | {p['img_per_s']:.1f} | {p['sampling_s']:.0f} s"
                     + (f" (compiling {p['compile_s']:.0f} s)" if p["compile_s"] else "")
                     + f" | {p['feature_s']:.0f} s | {p['metrics_s']:.0f} s | **{p['total_s'] / 60:.1f} min** | "
                     f"{'yes' if p['total_s'] <= GOAL_S else 'no'} |")
    for source in dict.fromkeys(p["source"] for p in projections):
        lines.insert(0, f"Sampling rates from `{source}`.\n")
    if not projections:
        lines.append(f"| no sampling figures ({', '.join(missing) or 'no --sampling given'}) | | | | "
                     f"{args.num_samples / features['img_per_s']:.0f} s | {metrics['seconds']:.0f} s | | |")
    return "\n".join(lines) + (
        f"\n\nFeature pass: {features['img_per_s']:.0f} img/s on {features['device']} (difftool's Inception extractor, "
        f"two calls per batch of {features['batch_size']}, {features['images']} images timed) with a stand-in of "
        f"{features['gflop_per_image']:.1f} GFLOP per image at {features['stand_in_size']} px (both calls; "
        f"Inception-v3: {INCEPTION_GFLOP} per call). Metrics: difftool.evaluate.score ({', '.join(metrics['computed'])}) "
        f"on {metric_images:,} × {metrics['dims']} features against as many, {metrics['seconds']:.1f} s on the CPU. "
        f"Model loading and building the reference statistics (cached after the first use) are not included.")


if __name__ == "__main__":
    main()
