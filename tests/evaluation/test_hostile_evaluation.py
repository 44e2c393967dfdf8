"""Evaluation inputs from elsewhere are data, never a weapon (issue 37): feature networks that fail or return
garbage, reference statistics that are no statistics, and the checks before training or scoring starts.

Each refusal is one `difftool: error:` line and exit code 2, and leaves nothing written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.data import make_shapes
from difftool.errors import UserError
from difftool.evaluation import features as features_mod
from difftool.evaluation import reference as reference_mod
from difftool.evaluation.features import load_extractor
from difftool.evaluation.imagesets import from_tensor
from difftool.training.loop import train
from tests.conftest import assert_user_error, invoke, tiny_config


def shapes(n: int, resolution: int = 8) -> torch.Tensor:
    return make_shapes(n, resolution).images


def write_images(folder: Path, n: int = 6, resolution: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(shapes(n, resolution)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    return folder


def script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


# ---------------------------------------------------------------- feature networks that misbehave (item 11)


class Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            raise RuntimeError("the weights were never trained")
        return x.float().mean(dim=(2, 3))


class ReturnsNaN(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)) * float("nan")


class TooWide(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 100_000)


class WidthOfTheBatch(torch.nn.Module):
    """3·N features for N images: the width changes with the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)).repeat(1, x.shape[0])


class LogitsAsProbs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.float().mean(dim=(2, 3))
        return f, f * 3 - 100


class ProbsOfOtherRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.float().mean(dim=(2, 3))
        return f, torch.full((x.shape[0] + 1, 4), 0.25)


@pytest.mark.parametrize("network, fragments", [
    (ReturnsNaN(), ["returned features that are NaN or infinite"]),
    (TooWide(), ["returned 100,000 features per image (at most 16,384"]),
    (WidthOfTheBatch(), ["per image for one batch and"]),
    (LogitsAsProbs(), ["probabilities whose rows are not each non-negative and summing to 1"]),
    (ProbsOfOtherRows(), ["returned probabilities of shape (3, 4) for 2 images"]),
])
def test_a_feature_network_that_returns_no_features_is_refused(network, fragments, tmp_path, scratch_cwd):
    images = write_images(tmp_path / "imgs", n=5)
    path = script(network, tmp_path / "net.pt")
    # The check pass on 2 images catches most; a batch of 3 the width that changes.
    result = invoke("evaluate", images, "--features", path, "--feature-batch-size", "3", "-o", tmp_path / "ev", "-q")
    line = assert_user_error(result, f"the feature extractor {path}", *fragments)
    assert "fix it, or use --features inception" in line
    assert not (tmp_path / "ev").exists(), "nothing written"


def test_a_feature_network_that_raises_says_what_went_wrong_not_its_source(tmp_path, scratch_cwd):
    path = script(Raises(), tmp_path / "raises.pt")
    result = invoke("evaluate", write_images(tmp_path / "imgs"), "--features", path, "-o", tmp_path / "ev")
    line = assert_user_error(result, f"the feature extractor {path} failed on 2 uint8 images of 8×8 px "
                                     "(RuntimeError: the weights were never trained)")
    assert "def forward" not in result.output and "prim" not in result.output and "HERE" not in result.output, line
    assert not (tmp_path / "ev").exists()


def test_script_error_picks_the_line_that_says_what_went_wrong():
    text = ("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript:\n"
            '  File "code/__torch__.py", line 9\n    raise ValueError("x: y")\n'
            "builtins.ValueError: width: must be 3\n")
    assert features_mod.script_error(RuntimeError(text)) == "ValueError: width: must be 3"
    assert features_mod.script_error(RuntimeError("one line: nothing else")) == "one line: nothing else"
    assert features_mod.script_error(RuntimeError("no error line\nin the text")) == "no error line"


# ---------------------------------------------------------------- reference statistics that are no statistics (item 12)


def reference_arrays(extractor_file: Path) -> dict:
    """The arrays of a good statistics .npz of 8-px shapes (written into the working folder), to spoil."""
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(from_tensor(shapes(40), "shapes"), extractor, batch_size=20)
    reference_mod.save(ref, Path("good.npz"))
    with np.load("good.npz") as npz:
        return dict(npz)


def spoiled(arrays: dict, how: str) -> dict:
    a = dict(arrays)
    width = len(a["mu"])
    if how == "mu of the wrong length":
        a["mu"] = a["mu"][:-1]
    elif how == "sigma not PSD":
        a["sigma"] = a["sigma"] - 10 * np.abs(a["sigma"]).max() * np.eye(width)
    elif how == "sigma not symmetric":
        a["sigma"] = a["sigma"] + np.triu(np.ones((width, width)), 1) * np.abs(a["sigma"]).max()
    elif how == "NaN features":
        a["features"] = a["features"].copy()
        a["features"][3, 2] = np.nan
    elif how == "NaN mean":
        a["mu"] = np.full(width, np.nan)
    elif how == "sigma a vector":
        a["sigma"] = np.diag(a["sigma"])
    elif how == "narrower than the network":  # consistent statistics of 8 features; the network gives 16
        a.update(mu=a["mu"][:8], sigma=a["sigma"][:8, :8], features=a["features"][:, :8])
    return a


SPOILS = {
    "mu of the wrong length": "sigma must be 15×15 like the length of mu",
    "sigma not PSD": "sigma is not positive semi-definite",
    "sigma not symmetric": "sigma is not symmetric",
    "NaN features": "features holds NaN or infinite values",
    "NaN mean": "mu holds NaN or infinite values",
    "sigma a vector": "sigma must be 16×16",
    "narrower than the network": "holds statistics of 8 features per image, but",
}


@pytest.mark.parametrize("how", SPOILS)
def test_reference_statistics_that_are_no_statistics_are_refused(how, tmp_path, extractor_file, scratch_cwd):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **spoiled(reference_arrays(extractor_file), how))
    result = invoke("evaluate", write_images(tmp_path / "imgs"), "-r", bad, "--features", extractor_file,
                    "-o", tmp_path / "ev", "--json")
    assert_user_error(result, str(bad), SPOILS[how], "difftool stats")
    assert not (tmp_path / "ev").exists(), "no metrics.json with NaN in it, nothing at all"


def test_statistics_whose_arrays_claim_gigabytes_are_refused_from_their_headers(tmp_path, extractor_file,
                                                                                 scratch_cwd):
    """A few bytes that np.load would try to unpack into 80 GB: the header is read, never the array."""
    arrays = reference_arrays(extractor_file)
    bad = tmp_path / "bomb.npz"
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "sigma"})
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 100_000)})
    with zipfile.ZipFile(bad, "a") as archive:
        archive.writestr("sigma.npy", header.getvalue())
    with pytest.raises(UserError, match=r"sigma must be 16×16 like the length of mu, it has shape \(100000, 100000\)"):
        reference_mod.load(bad)


def test_a_fifo_as_statistics_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "ref.npz"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            reference_mod.load(fifo)
        except UserError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():
        with open(fifo, "wb"):  # a writer that closes at once ends the blocked read
            pass
        pytest.fail("the FIFO was waited on")
    assert outcome and "not a regular file" in outcome[0]


def test_a_distance_that_is_not_finite_is_an_error_never_nan_in_json(tmp_path, extractor_file, scratch_cwd):
    huge = tmp_path / "huge.npz"
    arrays = reference_arrays(extractor_file)
    np.savez(huge, **{**arrays, "mu": np.full(len(arrays["mu"]), 1e300)})  # finite, but its square is not
    result = invoke("evaluate", write_images(tmp_path / "imgs"), "-r", huge, "--features", extractor_file,
                    "-o", tmp_path / "ev", "-q")
    assert_user_error(result, "fd came out inf against")
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- checked before the first training step (item 14)


def eval_sets(features: Path | str, reference: str = "data") -> list[str]:
    return ["eval.every=10", "eval.num_samples=6", f"eval.features={features}", f"eval.reference={reference}",
            "eval.scheduler=ddim", "eval.steps=2", "eval.guidance_scale=1", "train.max_steps=12"]


@pytest.mark.parametrize("how", ["narrower than the network", "mu of the wrong length"])
def test_training_refuses_reference_statistics_of_the_wrong_shape_before_the_first_step(how, tmp_path,
                                                                                        extractor_file, scratch_cwd):
    wrong = tmp_path / "wrong-shape.npz"
    np.savez(wrong, **spoiled(reference_arrays(extractor_file), how))
    with pytest.raises(UserError, match=f"cannot evaluate during training: .*{SPOILS[how][:20]}"):
        train(tiny_config(*eval_sets(extractor_file, str(wrong))), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "no config.yaml, no step"


def test_training_refuses_a_feature_network_that_raises_before_writing_anything(tmp_path, scratch_cwd):
    from tests.conftest import TINY_OVERRIDES

    path = script(Raises(), tmp_path / "raises.pt")
    sets = [arg for item in [*TINY_OVERRIDES, *eval_sets(path)] for arg in ("--set", item)]
    result = invoke("train", *sets, "--output", tmp_path / "run")
    assert_user_error(result, "cannot evaluate during training: the feature extractor",
                      "RuntimeError: the weights were never trained", "--set eval.every=0")
    assert not (tmp_path / "run").exists(), "no config.yaml left by a refused train"


# ---------------------------------------------------------------- a network is its content (item 17)


def test_a_copy_of_the_feature_network_under_another_name_is_the_same_network(tmp_path, extractor_file,
                                                                               scratch_cwd):
    images = write_images(tmp_path / "imgs", n=8)
    stats = tmp_path / "ref.npz"
    assert invoke("stats", images, "-o", stats, "--resolution", "8", "--features", extractor_file, "-q").exit_code == 0
    copy = tmp_path / "good2.pt"
    shutil.copy(extractor_file, copy)
    result = invoke("evaluate", images, "-r", stats, "--features", copy, "-o", tmp_path / "ev", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["fd"]) < 1e-3


def test_statistics_named_by_the_0_1_0_scheme_still_match_their_network(tmp_path, extractor_file):
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(from_tensor(shapes(10), "ten"), extractor, batch_size=5)
    digest = extractor.name.rpartition(":")[2]
    ref.extractor = f"torchscript:pooled:{digest}"  # what 0.1.0 wrote: the file's name, then its hash
    reference_mod.check_compatible(ref, extractor, 8, "old.npz")
    ref.extractor = "torchscript:pooled:000000000000"
    with pytest.raises(UserError, match="different networks"):
        reference_mod.check_compatible(ref, extractor, 8, "old.npz")


# ---------------------------------------------------------------- stats of samples at another size (item 18)


def sample_folder(root: Path, n: int = 6) -> Path:
    """A folder as `difftool sample` writes it: numbered PNGs and the sample.json that lists them."""
    write_images(root, n=n)
    (root / "sample.json").write_text(json.dumps({"num_images": n, "format": "png"}))
    return root


def test_stats_of_samples_at_another_resolution_are_refused(tmp_path, extractor_file, scratch_cwd):
    samples = sample_folder(tmp_path / "samples")
    npz = tmp_path / "samples.npz"
    np.savez(npz, shapes(6).permute(0, 2, 3, 1).numpy())
    for source in (samples, npz):
        result = invoke("stats", source, "--resolution", "16", "-o", tmp_path / "s16.npz", "--features",
                        extractor_file)
        assert_user_error(result, "holds 8-px images, not 16 px", "drop --resolution")
        assert not (tmp_path / "s16.npz").exists()
    result = invoke("stats", samples, "-o", tmp_path / "s.npz", "--features", extractor_file, "-q")
    assert result.exit_code == 0, result.output
    assert "8 px" in result.stderr and reference_mod.load(tmp_path / "s.npz").resolution == 8
    result = invoke("stats", "shapes", "-o", tmp_path / "d.npz", "--features", extractor_file, "-q",
                    "--reference-images", "20")
    assert result.exit_code == 0, result.output
    assert reference_mod.load(tmp_path / "d.npz").resolution == 32, "a data set's default size"


def test_features_beyond_float16_are_stored_so_that_they_load_again(tmp_path, extractor_file):
    """float16 turns 1e5 into inf, which loading refuses: such features are kept in float32."""
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(from_tensor(shapes(10), "ten"), extractor, batch_size=5)
    ref.features = ref.features * 1e5
    reference_mod.save(ref, tmp_path / "wide.npz")
    np.testing.assert_allclose(reference_mod.load(tmp_path / "wide.npz").features, ref.features, rtol=1e-6)
