"""Shared fixtures: a tiny recipe (8-px shapes, a UNet of a few thousand parameters)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from difftool import config as config_mod

# A few thousand parameters at 8 px: two levels of 8/16 channels, GroupNorm of 4.
TINY_OVERRIDES = [
    "model.block_out_channels=[8, 16]",
    "model.layers_per_block=1",
    "model.attention_resolutions=[]",
    "model.mid_block_attention=false",
    "model.norm_num_groups=4",
    "model.class_conditional=true",
    "data.dataset=shapes",
    "data.resolution=8",
    "data.num_images=64",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.lr=0.001",
    "train.mixed_precision=no",  # exact comparisons between runs need fp32
    "train.warmup_steps=2",
    "scheduler.num_train_timesteps=50",
    "checkpoint.every=3",
    "checkpoint.total_limit=null",
    "sample.every=3",
    "sample.num_images=5",
    "sample.steps=3",
    "log.every=1",
    "eval.every=0",  # the quickstart's evaluation needs the Inception weights; tests that evaluate switch it on
]

FIXTURES = Path(__file__).parent / "fixtures"  # files the tests read; see fixtures/README.md
# Run folders made by each released version whose format differs.
RELEASED_RUNS = {version: FIXTURES / f"run-{version}" for version in ("0.1.0", "0.2.0")}
FIXTURE_RUN = RELEASED_RUNS["0.1.0"]


def tiny_config(*extra: str) -> config_mod.Config:
    return config_mod.load_config("quickstart", TINY_OVERRIDES + list(extra))


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path_factory, monkeypatch):
    """Keep the decoded-image cache of every test out of the user's ~/.cache."""
    monkeypatch.setenv("DIFFTOOL_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """The tiny config as a recipe file, for tests that drive the real CLI."""
    path = tmp_path / "tiny.yaml"
    path.write_text(config_mod.dump_yaml(tiny_config()))
    return path


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, exactly one `difftool: error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("difftool: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def invoke(*args):
    """The `difftool` command in-process (typer's CliRunner); arguments may be paths."""
    from typer.testing import CliRunner

    from difftool.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def scratch_cwd(tmp_path, monkeypatch):
    """No debug mode from the caller's shell, and a scratch working folder (default outputs land there)."""
    monkeypatch.delenv("DIFFTOOL_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def difftool_cmd() -> list[str]:
    """The installed `difftool` executable (or the module, when run from a source tree)."""
    exe = shutil.which("difftool")
    return [exe] if exe else [sys.executable, "-m", "difftool"]


def pytest_configure(config) -> None:
    """Let the difftool processes that tests interrupt see SIGINT as Ctrl-C, and keep the suite's jobs apart from
    the user's.

    A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored; children inherit that,
    and Python then never raises KeyboardInterrupt. A handler, unlike "ignored", is reset at exec.

    The jobs of the suite register in a folder of their own (threads.py): a training the developer runs beside the
    tests would otherwise add a `note: computing with 1 of 2 cores` line to every command a test expects one line of.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="difftool-tests-")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need CUDA: elsewhere they are skipped, saying so (benchmarks/gpu_check.py runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.py runs the gpu tests on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny training run (checkpoints at steps 3 and 6, model/ exported), shared read-only.

    Tests that change it must copy it first (shutil.copytree).
    """
    from difftool.training.loop import train

    root = tmp_path_factory.mktemp("tiny-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFTOOL_CACHE", str(root / "cache"))
        train(tiny_config(), root / "run")
    return root / "run"


# ---------------------------------------------------------------- feature extractors for evaluation tests


class _PooledFeatures(torch.nn.Module):
    """A stand-in feature network: 4x4 average-pooled pixels through fixed random projections.

    Its features move with the image content, so distances between image sets behave like the real
    metrics' (identical sets score 0, other data sets do not), while it runs offline in microseconds.
    """

    def __init__(self, dims: int = 16, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, dims, generator=g))
        self.register_buffer("head", torch.randn(dims, classes, generator=g))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj


class _TupleExtractor(_PooledFeatures):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, torch.softmax(f @ self.head, dim=1)


class _FakeInception(_PooledFeatures):
    """The calling convention of NVIDIA's inception-2015-12-05.pt TorchScript."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.linspace(-3.0, 3.0, 5))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        f = self.features(img)
        if return_features:
            return f
        logits = f @ self.head
        return torch.softmax(logits if no_output_bias else logits + self.bias, dim=1)


@pytest.fixture
def extractor_file(tmp_path: Path) -> Path:
    """A TorchScript feature extractor (features, probs), as `--features FILE` takes."""
    path = tmp_path / "pooled.pt"
    torch.jit.save(torch.jit.script(_TupleExtractor()), str(path))
    return path


@pytest.fixture
def fake_inception(tmp_path: Path) -> Path:
    """A TorchScript file with the Inception file's interface, as `--inception-weights FILE` takes."""
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    return path


@pytest.fixture
def hub_inception(tmp_path, monkeypatch, fake_inception) -> Path:
    """The stand-in Inception file where `load_extractor("inception")` looks (torch's hub cache); no download."""
    from difftool.evaluation.features import INCEPTION_FILE

    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(fake_inception, cached)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    return cached
