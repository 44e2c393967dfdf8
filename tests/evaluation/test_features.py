"""Feature networks (evaluation/features.py): Inception, DINOv2 and TorchScript files, moved, refused, found.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from difftool.errors import UserError
from difftool.evaluation import features as features_mod
from difftool.evaluation.features import (
    Dinov2Extractor,
    InceptionExtractor,
    TorchScriptExtractor,
    load_extractor,
)
from tests.evaluation.conftest import shapes

runner = CliRunner()


# ---------------------------------------------------------------- feature extractors


def test_inception_file_gives_features_and_probabilities(fake_inception):
    extractor = load_extractor("inception", inception_weights=fake_inception, device="cpu")
    assert isinstance(extractor, InceptionExtractor)
    assert extractor.name.startswith("inception-2015-12-05:") and extractor.distance_name == "FID"
    images = shapes(6)
    feats, probs = extractor(images)
    module = torch.jit.load(str(fake_inception))
    # features from return_features=True, probabilities from the bias-free softmax
    torch.testing.assert_close(feats, module(images, return_features=True))
    torch.testing.assert_close(probs, module(images, no_output_bias=True))
    assert not torch.allclose(probs, module(images))


@pytest.mark.parametrize("spec", ["inception", "file"])
def test_the_network_is_moved_to_the_extractor_device(spec, extractor_file, fake_inception):
    """TorchScript loads onto the CPU; on a GPU the images go to CUDA, so the network must follow them
    (the meta device stands in for CUDA here; tests/test_gpu.py runs the real pass)."""
    extractor = (load_extractor("inception", inception_weights=fake_inception, device="meta", probe_resolution=None)
                 if spec == "inception" else load_extractor(str(extractor_file), device="meta", probe_resolution=None))
    assert {b.device.type for b in extractor.module.buffers()} == {"meta"}


def test_grayscale_images_are_seen_as_gray_rgb(extractor_file):
    extractor = load_extractor(str(extractor_file), device="cpu")
    gray = shapes(4)[:, :1]
    torch.testing.assert_close(extractor(gray)[0], extractor(gray.expand(-1, 3, -1, -1))[0])


def test_torchscript_extractor_name_follows_the_file_content(extractor_file, tmp_path):
    first = load_extractor(str(extractor_file), device="cpu")
    assert isinstance(first, TorchScriptExtractor) and first.distance_name == "FD"
    copy = tmp_path / "other" / extractor_file.name
    copy.parent.mkdir()
    shutil.copy(extractor_file, copy)
    assert load_extractor(str(copy), device="cpu").name == first.name

    class Wider(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean(dim=(2, 3)) * 2

    torch.jit.save(torch.jit.script(Wider()), str(copy))
    assert load_extractor(str(copy), device="cpu").name != first.name


def test_extractor_with_wrong_output_is_refused(tmp_path):
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten()

    path = tmp_path / "flat.pt"
    torch.jit.save(torch.jit.script(Flat()), str(path))
    with pytest.raises(UserError, match="returned features of shape .384,. for 2 images .an N×D tensor is needed"):
        load_extractor(str(path), device="cpu", probe_resolution=None)(shapes(2))
    with pytest.raises(UserError, match="shape .6144,. for 2 images"):
        load_extractor(str(path), device="cpu")  # the check pass, at 32 px


def test_not_a_torchscript_file_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a TorchScript file"):
        load_extractor(str(path))
    with pytest.raises(UserError, match="unknown --features 'incepton'"):
        load_extractor("incepton")


def test_missing_inception_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        load_extractor("inception")
    message = str(err.value)
    assert features_mod.INCEPTION_URL in message
    assert str(tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt") in message
    assert "--inception-weights" in message and "\n" not in message


def test_inception_weights_found_in_the_hub_cache(hub_inception, fake_inception):
    assert load_extractor("inception", device="cpu").name == load_extractor(
        "inception", inception_weights=fake_inception, device="cpu").name


def test_dinov2_features_are_the_normalised_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    extractor = load_extractor(f"dinov2:{tmp_path / 'dino'}", device="cpu")
    assert isinstance(extractor, Dinov2Extractor) and extractor.distance_name == "FD_DINOv2"
    images = shapes(3)
    feats, probs = extractor(images)
    assert feats.shape == (3, 16) and probs is None
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = torch.tensor(features_mod.IMAGENET_MEAN), torch.tensor(features_mod.IMAGENET_STD)
    with torch.no_grad():
        expected = model(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).pooler_output
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
