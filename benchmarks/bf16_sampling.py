"""What `difftool sample --dtype bf16` changes in the images of a trained model, and what it gains.

    python benchmarks/bf16_sampling.py runs/quickstart-shapes            # after the quickstart's difftool train
    python benchmarks/bf16_sampling.py RUN --scheduler dpm-solver --steps 20 --num-images 64

The same seeds are sampled in fp32 and in bf16 (the UNet in bf16, the sampler's arithmetic in
fp32), alternating, each in a fresh process; reported are the speed of each (median) and how far
the bf16 images are from the fp32 ones: mean and largest per-pixel difference, and the share of
pixels more than 8 levels off. A random-weight model exaggerates the difference (its trajectories
are chaotic), which is why this runs on a trained one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, median, report, run_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained model (run folder, pipeline, .safetensors)")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report(worker(args))
        return
    import numpy as np

    common = [args.model, "--scheduler", args.scheduler, "--steps", str(args.steps), "--num-images",
              str(args.num_images), "--batch-size", str(args.batch_size)]
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for dtype, runs in speeds.items():
                result = run_worker(Path(__file__), [*common, "--worker", dtype, "--out", f"{tmp}/{dtype}.npz"])
                runs.append(result["img_per_s"])
                print(f"run {repeat + 1}/{args.repeats} {dtype}: {result['img_per_s']:.2f} img/s", flush=True)
        fp32 = np.load(f"{tmp}/fp32.npz")["images"].astype(np.int16)
        bf16 = np.load(f"{tmp}/bf16.npz")["images"].astype(np.int16)
    diff = np.abs(fp32 - bf16)
    body = ("| dtype | img/s (median) | runs |\n|---|---|---|\n"
            + "".join(f"| {d} | {median(v):.2f} | {', '.join(f'{s:.2f}' for s in v)} |\n" for d, v in speeds.items())
            + f"\nbf16 ÷ fp32: {median(speeds['bf16']) / median(speeds['fp32']):.2f}×. Pixel difference of the bf16 "
            f"images from the fp32 ones (0-255): mean {diff.mean():.2f}, largest {diff.max()}, "
            f"{(diff > 8).mean() * 100:.1f}% of pixels more than 8 off. Model: {args.model}; {args.scheduler}, "
            f"{args.steps} steps, {args.num_images} images in batches of {args.batch_size}.")
    command = f"python benchmarks/bf16_sampling.py {' '.join(common)} --repeats {args.repeats}"
    if args.no_record:
        print(body)
    else:
        append_results(f"bf16 sampling on a trained model ({Path(args.model).name})", command, body)


def worker(args) -> dict:
    import numpy as np

    from difftool.sampling.job import SampleRequest, generate

    request = SampleRequest(num_images=args.num_images, scheduler=args.scheduler, steps=args.steps,
                            batch_size=args.batch_size, dtype=args.worker, format="npz")
    with tempfile.TemporaryDirectory() as tmp:
        result = generate(args.model, request, Path(tmp) / "out")
        with np.load(Path(tmp) / "out" / "samples.npz") as npz:
            np.savez(args.out, images=npz["arr_0"])
    return {"img_per_s": result.made / result.seconds}


if __name__ == "__main__":
    main()
