"""How much faster can a UNet call get in fp32 on this machine? The share of its time in convolutions.

    python benchmarks/fp32_bound.py                                # quickstart model, sampling call, batch 64
    python benchmarks/fp32_bound.py --recipe cifar10 --batch-size 32 --training

The UNet's FLOPs are nearly all in its convolutions. This profiles one plain eager call (what a
pipeline or the plain training loop runs: forward, or forward and backward) and sums the time of
the convolution kernels, in the default layout and in channels_last (oneDNN's fastest for most
shapes here). Any implementation that computes the same convolutions in fp32 still pays that
time, so total ÷ fastest convolution time bounds its speed-up over the plain call, even if
everything else (normalisation, activations, the sampler, the optimizer) cost nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, attainable_peak, flop_rate, model_flops_per_image

CONVOLUTION_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                       "aten::_slow_conv2d_backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--training", action="store_true", help="forward and backward instead of a sampling call")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls (after two untimed ones)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from difftool.allocator import keep_freed_memory

    keep_freed_memory()  # so that page faults do not count against the call (see RESULTS.md)
    unet = _unet(args.recipe)
    plain = _profile(unet, args, channels_last=False)
    fastest_conv = min(plain["conv_s"], _profile(unet, args, channels_last=True)["conv_s"])
    flops = model_flops_per_image(unet, training=args.training) * args.batch_size
    peak = attainable_peak("fp32")
    what = "forward and backward" if args.training else "forward (one sampling step)"
    body = (f"| | seconds per call | FLOP/s | share of fp32 peak |\n|---|---|---|---|\n"
            f"| plain eager call, all of it | {plain['total_s']:.3f} | {flop_rate(flops / plain['total_s'])} | "
            f"{100 * flops / plain['total_s'] / peak:.0f}% |\n"
            f"| its convolutions (default layout) | {plain['conv_s']:.3f} | {flop_rate(flops / plain['conv_s'])} | "
            f"{100 * flops / plain['conv_s'] / peak:.0f}% |\n"
            f"| the convolutions in their fastest layout | {fastest_conv:.3f} | {flop_rate(flops / fastest_conv)} | "
            f"{100 * flops / fastest_conv / peak:.0f}% |\n\n"
            f"Upper bound on any fp32 speed-up over the plain call: **{plain['total_s'] / fastest_conv:.2f}×** "
            f"(everything but the convolutions free). Model: the `{args.recipe}` recipe's UNet, {what}, batch "
            f"{args.batch_size}, {flops / 1e9:.1f} GFLOP per call; attainable fp32 peak {flop_rate(peak)} (a large matmul "
            f"or 3x3 convolution, benchmarks/common.py).")
    command = (f"python benchmarks/fp32_bound.py --recipe {args.recipe} --batch-size {args.batch_size}"
               + (" --training" if args.training else ""))
    if args.no_record:
        print(body)
    else:
        append_results(f"fp32 bound, {args.recipe} model, {'training' if args.training else 'sampling'}",
                       command, body)


def _unet(recipe: str):
    import torch

    from difftool import config as config_mod
    from difftool.models.build import build_unet

    cfg = config_mod.load_config(recipe, ["model.class_conditional=false"])
    torch.manual_seed(0)
    return build_unet(cfg.model, resolution=cfg.data.resolution, channels=3, num_classes=None)


def _profile(unet, args, *, channels_last: bool) -> dict:
    """Seconds per call, in all and in convolution kernels (profiler self time)."""
    import torch
    from torch.profiler import profile

    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=layout).train(args.training)
    size = unet.config.sample_size
    x = torch.randn(args.batch_size, unet.config.in_channels, size, size).to(memory_format=layout)
    t = torch.randint(0, 1000, (args.batch_size,))

    def call() -> None:
        if args.training:
            unet(x, t).sample.square().mean().backward()
            unet.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                unet(x, t)

    for _ in range(2):
        call()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    total = (time.perf_counter() - start) / args.calls
    with profile() as prof:
        for _ in range(args.calls):
            call()
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONVOLUTION_KERNELS)
    return {"total_s": total, "conv_s": conv_us / 1e6 / args.calls}


if __name__ == "__main__":
    main()
