"""Feature extractors for the evaluation metrics: the FID Inception, DINOv2, or any TorchScript file.

Every extractor takes uint8 N×3×H×W images (any H, W: each resizes to its own input as its metric
defines) and returns float32 features, plus class probabilities where the network has a classifier
(the Inception Score needs them). Its `name` says exactly which network made the features, so
reference statistics made with another one are refused rather than compared.

The standard FID network is the TensorFlow Inception-v3 of 2015-12-05 that the FID literature uses.
We load the TorchScript translation NVIDIA publishes for StyleGAN2-ADA and EDM: it needs nothing but
torch, where torch-fidelity's and pytorch-fid's copies of the same network need torchvision, which
does not install beside every torch build (and not beside the CPU build we test with).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difftool.errors import UserError, first_line

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
DINOV2_DEFAULT = "facebook/dinov2-large"  # ViT-L/14, the network of FD_DINOv2 (Stein et al. 2023)
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILT_IN = ("inception", "dinov2")


@dataclass
class Features:
    """What one pass over a set of images gives: features (N×D) and, where there is a classifier, probs (N×K)."""

    features: np.ndarray
    probs: np.ndarray | None

    def __len__(self) -> int:
        return len(self.features)


class Extractor:
    """An image network turned into features; subclasses implement `_run` on a batch already on `device`."""

    name: str  # names the network and its weights: statistics with another name are not comparable
    distance_name: str = "FD"  # what the Fréchet distance on these features is called
    # Class probabilities (the Inception Score) cost Inception a second call per batch: a caller that needs no
    # Inception Score (statistics, evaluation during training) turns them off.
    probs: bool = True

    def __init__(self, module: torch.nn.Module, device: torch.device):
        # TorchScript files load onto the CPU: the network goes where the images will go.
        self.module, self.device = module.to(device), device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"feature extractors take uint8 N×C×H×W images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale is seen as gray RGB, as every FID tool does
        features, probs = self._run(images.to(self.device))
        return features.float().cpu(), None if probs is None else probs.float().cpu()

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class InceptionExtractor(Extractor):
    """NVIDIA's TorchScript Inception: pool3 features (2048) and the 1008-way softmax without its bias.

    `no_output_bias` is how the original Inception Score code computed probabilities. The file returns
    features or probabilities per call, never both, hence two calls per batch.
    """

    distance_name = "FID"

    def __init__(self, module, device, digest: str):
        super().__init__(module, device)
        self.name = f"inception-2015-12-05:{digest[:12]}"

    def _run(self, images):
        features = self.module(images, return_features=True)
        return features, self.module(images, no_output_bias=True) if self.probs else None


class TorchScriptExtractor(Extractor):
    """A user's TorchScript file: uint8 N×3×H×W in, features (or a (features, probs) tuple) out."""

    def __init__(self, module, device, path: Path, digest: str):
        super().__init__(module, device)
        self.name = f"torchscript:{path.stem}:{digest[:12]}"

    def _run(self, images):
        out = self.module(images)
        if isinstance(out, (tuple, list)):
            features, probs = out[0], out[1] if len(out) > 1 else None
        else:
            features, probs = out, None
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(images):
            raise UserError(f"the feature extractor {self.name} must return an N×D tensor (or a tuple of features "
                            f"and N×K probabilities) for N images; it returned {_shape_of(features)}")
        return features, probs


class Dinov2Extractor(Extractor):
    """DINOv2 (transformers): the normalised CLS token of images resized to 224 px (bicubic, antialiased)."""

    distance_name = "FD_DINOv2"

    def __init__(self, module, device, model_id: str):
        super().__init__(module, device)
        self.name = f"dinov2:{model_id}"
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _run(self, images):
        x = torch.nn.functional.interpolate(images.float() / 255, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1)
        return self.module(pixel_values=(x - self.mean) / self.std).pooler_output, None


def load_extractor(spec: str = "inception", *, inception_weights: Path | None = None,
                   device: torch.device | str | None = None, weights_option: str = "--inception-weights") -> Extractor:
    """`inception` (default), `dinov2`, `dinov2:MODEL` (hub id or folder), or a TorchScript file path.

    `weights_option` names where the caller's user gives `inception_weights` (an option, or a config key), for
    the messages.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec == "inception":
        path = Path(inception_weights) if inception_weights else inception_path(weights_option)
        module = _load_torchscript(path, "the Inception weights")
        return InceptionExtractor(module, device, _sha256(path))
    if inception_weights is not None:
        raise UserError(f"{weights_option} applies to inception features, not {spec}")
    if spec == "dinov2" or spec.startswith("dinov2:"):
        model_id = spec.partition(":")[2] or DINOV2_DEFAULT
        return Dinov2Extractor(_load_dinov2(model_id), device, model_id)
    path = Path(spec).expanduser()
    if spec and (path.suffix in (".pt", ".pth", ".ts", ".jit") or path.exists()):  # Path("") exists: it is "."
        module = _load_torchscript(path, "the feature extractor")
        return TorchScriptExtractor(module, device, path, _sha256(path))
    raise UserError(f"unknown --features '{spec}': use inception, dinov2, dinov2:MODEL or a TorchScript file (.pt)")


def extract(extractor: Extractor, batches: Iterable[torch.Tensor], *, on_batch=None) -> Features:
    """Run `extractor` over uint8 batches and concatenate; `on_batch(n)` reports progress."""
    features, probs = [], []
    for batch in batches:
        f, p = extractor(batch)
        features.append(f.numpy())
        if p is not None:
            probs.append(p.numpy())
        if on_batch is not None:
            on_batch(len(batch))
    if not features:
        raise ValueError("no images to extract features from")
    return Features(np.concatenate(features), np.concatenate(probs) if len(probs) == len(features) else None)


def inception_path(weights_option: str = "--inception-weights") -> Path:
    """The cached Inception file, downloaded into torch's hub cache the first time."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=True)
    except Exception as err:  # no network, a proxy, a full disk: the remedy is the same
        reason = first_line(err, 120)
        raise UserError(f"the FID Inception weights are not in {path.parent} and could not be downloaded ({reason}); "
                        f"download {INCEPTION_URL} and place it at {path}, or {_give(weights_option)}") from err
    return path


def _give(option: str) -> str:
    """How to give a file to `option`: `pass --inception-weights FILE`, `set eval.inception_weights=FILE`."""
    return f"pass {option} FILE" if option.startswith("-") else f"set {option}=FILE"


def _load_torchscript(path: Path, what: str) -> torch.nn.Module:
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the published networks are in it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as err:  # a state dict, a pickle, a truncated download: none is a TorchScript archive
        raise UserError(f"{path} is not a TorchScript file ({first_line(err, 120)}); "
                        f"{what} must be saved with torch.jit.save") from err


def _load_dinov2(model_id: str) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(model_id).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"could not load DINOv2 weights '{model_id}' ({first_line(err)}); "
                        f"give a folder saved with save_pretrained (--features dinov2:PATH) or connect to the hub "
                        f"once so the weights are cached") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _shape_of(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
