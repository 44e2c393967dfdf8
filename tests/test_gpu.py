"""The CUDA path, which the CPU suite cannot reach: mixed-precision training, the fp16 loss scaler,
torch.compile, sampling (against the CPU's images, and in half precision) and evaluation's feature pass.

Every test is marked `gpu` and skipped without CUDA (conftest.py). `benchmarks/gpu_check.py` runs
them first on a lent GPU machine (README, "Running the GPU check on a lent device").
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difftool.data import make_shapes
from difftool.evaluation.evaluate import MetricOptions, evaluate
from difftool.evaluation.features import load_extractor
from difftool.rundir import RunDir
from difftool.sampling.job import SampleRequest, generate
from difftool.training.loop import train
from tests.conftest import tiny_config
from tests.training.conftest import all_finite, losses

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    """fp32 as the CPU computes it: `train` switches TF32 on for the process, and it rounds like fp16.

    Set and restored by hand: these flags are computed attributes, which monkeypatch cannot restore."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = saved


def sample(model: Path, output: Path, **request) -> np.ndarray:
    """uint8 N×H×W×C images of `difftool sample` as a library call (on the GPU where there is one)."""
    request = SampleRequest(**{"num_images": 8, "scheduler": "ddim", "steps": 10, "batch_size": 8, "format": "npz",
                               **request})
    generate(model, request, output)
    with np.load(output / "samples.npz") as npz:
        return npz["arr_0"].astype(np.int16)


def sample_on_cpu(model: Path, output: Path, **request) -> np.ndarray:
    """The same call in a process that sees no GPU (accelerate's device is chosen once per process)."""
    code = ("import json, sys; from difftool.sampling.job import SampleRequest, generate; "
            "generate(sys.argv[1], SampleRequest(**json.loads(sys.argv[2])), sys.argv[3])")
    request = {"num_images": 8, "scheduler": "ddim", "steps": 10, "batch_size": 8, "format": "npz", **request}
    proc = subprocess.run([sys.executable, "-c", code, str(model), json.dumps(request), str(output)],
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(output / "samples.npz") as npz:
        return npz["arr_0"].astype(np.int16)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_on_cuda(precision, tmp_path, capsys):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU does not compute bf16")
    result = train(tiny_config(f"train.mixed_precision={precision}", "train.max_steps=4"), tmp_path / precision)
    assert result.finished
    assert f"on cuda ({precision})" in capsys.readouterr().err
    assert all(math.isfinite(loss) for loss in losses(result.run))
    assert all_finite(result.run / "model" / "unet", "diffusion_pytorch_model.safetensors")


def test_fp16_leaves_overflowing_steps_to_the_loss_scaler(tmp_path, monkeypatch, capsys):
    """Under fp16, --skip-nonfinite leaves overflowing steps to the loss scaler (README: Non-finite loss).

    A start scale of 2^32 makes the first steps' fp16 gradients overflow for certain: the scaler skips
    them and halves its scale until they fit; difftool neither warns, counts them, nor stops the run.
    """
    start = 2.0**32
    real_init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *args, **kwargs: real_init(self, *args, **{**kwargs, "init_scale": start}))
    cfg = tiny_config("train.mixed_precision=fp16", "train.skip_nonfinite=1", "train.max_steps=24",
                      "checkpoint.every=24", "sample.every=24")
    result = train(cfg, tmp_path / "fp16")
    assert result.finished
    scaler = torch.load(RunDir(result.run).checkpoints()[-1] / "scaler.pt", weights_only=True)
    assert scaler["scale"] < start, "the scaler skipped the overflowing steps and lowered its scale"
    assert "non-finite gradients" not in capsys.readouterr().err
    records = [json.loads(line) for line in RunDir(result.run).metrics.read_text().splitlines()]
    assert all(r.get("skipped_steps", 0) == 0 and math.isfinite(r["loss"]) for r in records)
    assert all_finite(result.run / "model" / "unet", "diffusion_pytorch_model.safetensors")


def test_compile_trains_like_eager_on_cuda(tmp_path):
    from torch._dynamo.utils import counters

    eager = train(tiny_config("train.max_steps=3"), tmp_path / "eager")
    counters.clear()
    compiled = train(tiny_config("train.max_steps=3", "train.compile=true"), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(losses(compiled.run), losses(eager.run), rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------- sampling


def test_sampling_on_cuda_gives_the_cpu_images(tiny_run, tmp_path, no_tf32):
    """The same seeds give the same images on either device, to float round-off (a wrong seed, device or dtype
    gives other images altogether)."""
    torch.cuda.reset_peak_memory_stats()
    on_cuda = sample(tiny_run, tmp_path / "cuda")
    assert torch.cuda.max_memory_allocated() > 0, "generate sampled on the GPU"
    diff = np.abs(on_cuda - sample_on_cpu(tiny_run, tmp_path / "cpu"))
    assert diff.mean() < 0.1 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_sampling_on_cuda_is_close_to_fp32(tiny_run, tmp_path, dtype):
    """As tests/test_sample.py's bf16 test on the CPU: 3 steps, a mean difference under 8 levels."""
    half = sample(tiny_run, tmp_path / dtype, dtype=dtype, steps=3)
    diff = np.abs(half - sample(tiny_run, tmp_path / "fp32", steps=3))
    assert diff.mean() < 8, diff.mean()
    assert json.loads((tmp_path / dtype / "sample.json").read_text())["dtype"] == dtype


def test_compiled_sampling_on_cuda_gives_the_eager_images(tiny_run, tmp_path, no_tf32):
    diff = np.abs(sample(tiny_run, tmp_path / "compiled", compile=True) - sample(tiny_run, tmp_path / "eager"))
    assert diff.mean() < 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


# ---------------------------------------------------------------- evaluation


def test_feature_pass_on_cuda_matches_the_cpu(fake_inception):
    images = make_shapes(16, 32).images
    on_cpu = load_extractor("inception", inception_weights=fake_inception, device="cpu")(images)
    extractor = load_extractor("inception", inception_weights=fake_inception)
    assert extractor.device.type == "cuda"
    for got, expected in zip(extractor(images), on_cpu, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_evaluate_samples_and_scores_a_model_on_cuda(tiny_run, tmp_path, extractor_file):
    result = evaluate(str(tiny_run), reference=None, options=MetricOptions(features=str(extractor_file), batch_size=4),
                      request=SampleRequest(num_images=8, steps=3), output=tmp_path / "eval")
    assert result.record["num_images"] == 8 and math.isfinite(result.record["is_mean"])
