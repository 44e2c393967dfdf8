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
import io
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difftool.errors import UserError, first_line
from difftool.evaluation.judge import check_judge, judge_info
from difftool.evaluation.metrics import PROB_ATOL
from difftool.threads import announce, rebalance

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
DINOV2_DEFAULT = "facebook/dinov2-large"  # ViT-L/14, the network of FD_DINOv2 (Stein et al. 2023)
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILT_IN = ("inception", "dinov2")
# Features per image: Inception gives 2048, DINOv2-L 1024. Far wider, a covariance matrix passes 2 GB (float64),
# so a network that returns more is refused rather than let run the machine out of memory. Classes too.
MAX_WIDTH = 16_384
PROBE_IMAGES, PROBE_SEED, PROBE_RESOLUTION = 2, 0, 32  # the images of the check pass before any work (`probe`)
# The line of a TorchScript error that says what went wrong ("builtins.RuntimeError: ..."); the lines before it
# are the network's source code.
_SCRIPT_ERROR = re.compile(r"^(?:builtins\.)?([\w.]*(?:Error|Exception)): (.+)$")


@dataclass
class Features:
    """What one pass over a set of images gives: features (N×D) and, where there is a classifier, probs (N×K)."""

    features: np.ndarray
    probs: np.ndarray | None

    def __len__(self) -> int:
        return len(self.features)


class Extractor:
    """An image network turned into features; subclasses implement `_run` on a batch already on `device`."""

    name: str  # names the network by its content: statistics with another name are not comparable
    label: str  # names it for a person: the file, or the model id
    distance_name: str = "FD"  # what the Fréchet distance on these features is called
    # Class probabilities (the Inception Score) cost Inception a second call per batch: a caller that needs no
    # Inception Score (statistics, evaluation during training) turns them off.
    probs: bool = True
    width: int | None = None  # features per image, fixed by the first batch (see `probe`)
    classes: int | None = None  # class probabilities per image, likewise
    judge: dict | None = None  # a difftool judge's `info` (evaluation/judge.py): what its classes are

    def __init__(self, module: torch.nn.Module, device: torch.device):
        # TorchScript files load onto the CPU: the network goes where the images will go.
        self.module, self.device = module.to(device), device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"feature extractors take uint8 N×C×H×W images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale is seen as gray RGB, as every FID tool does
        try:
            features, probs = self._run(images.to(self.device))
        except (UserError, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - a network from a file fails in whatever way its code does
            raise UserError(f"the feature extractor {self.label} failed on {len(images)} uint8 images of "
                            f"{images.shape[2]}×{images.shape[3]} px ({script_error(err)}); it must take uint8 "
                            f"N×3×H×W images of any size: fix it, or use --features inception") from err
        features = self._checked("features", features, len(images), "width")
        probs = None if probs is None else self._checked("probabilities", probs, len(images), "classes")
        if probs is not None and ((probs < 0).any() or not torch.allclose(probs.sum(1), torch.ones(()),
                                                                          atol=PROB_ATOL)):
            raise self._refusal("probabilities whose rows are not each non-negative and summing to 1 (softmax "
                                "outputs, not logits)")
        return features, probs

    def _checked(self, what: str, value, count: int, attribute: str) -> torch.Tensor:
        """`value` as float32 on the CPU if it is a finite count×D tensor, D no wider than MAX_WIDTH and the same
        in every batch (kept in `attribute`); else a UserError saying what the network returned."""
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or len(value) != count or value.is_complex():
            raise self._refusal(f"{what} of {_shape_of(value)} for {count} images (an N×D tensor is needed)")
        if not 1 <= value.shape[1] <= MAX_WIDTH:
            raise self._refusal(f"{value.shape[1]:,} {what} per image (at most {MAX_WIDTH:,} are taken)")
        if getattr(self, attribute) not in (None, value.shape[1]):
            raise self._refusal(f"{value.shape[1]} {what} per image for one batch and {getattr(self, attribute)} "
                                f"for another")
        value = value.float().cpu()
        if not torch.isfinite(value).all():
            raise self._refusal(f"{what} that are NaN or infinite")
        setattr(self, attribute, value.shape[1])
        return value

    def _refusal(self, returned: str) -> UserError:
        return UserError(f"the feature extractor {self.label} returned {returned}; it must return N×D features, "
                         f"or a tuple of N×D features and N×K class probabilities, all finite: fix it, or use "
                         f"--features inception")

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class InceptionExtractor(Extractor):
    """NVIDIA's TorchScript Inception: pool3 features (2048) and the 1008-way softmax without its bias.

    `no_output_bias` is how the original Inception Score code computed probabilities. The file returns
    features or probabilities per call, never both, hence two calls per batch.
    """

    distance_name = "FID"

    def __init__(self, module, digest: str, device):
        super().__init__(module, device)
        self.name = f"inception-2015-12-05:{digest[:12]}"
        self.label = f"inception-2015-12-05 ({digest[:12]})"

    def _run(self, images):
        features = self.module(images, return_features=True)
        return features, self.module(images, no_output_bias=True) if self.probs else None


class TorchScriptExtractor(Extractor):
    """A user's TorchScript file: uint8 N×3×H×W in, features (or a (features, probs) tuple) out.

    A run's judge (RUN/eval/judge.pt) is one too; its distance is FD_judge and its classes are known."""

    def __init__(self, module, digest: str, device, path: Path):
        super().__init__(module, device)
        # By content alone: a copy of the file under another name is the same network.
        self.name, self.label = f"torchscript:{digest[:12]}", str(path)
        self.judge = judge_info(module)
        if self.judge is not None:
            self.distance_name = "FD_judge"

    def _run(self, images):
        out = self.module(images)
        if isinstance(out, (tuple, list)) and len(out) in (1, 2):
            return out[0], out[1] if len(out) > 1 else None
        return out, None


class Dinov2Extractor(Extractor):
    """DINOv2 (transformers): the normalised CLS token of images resized to 224 px (bicubic, antialiased)."""

    distance_name = "FD_DINOv2"

    def __init__(self, module, device, model_id: str):
        super().__init__(module, device)
        self.name = self.label = f"dinov2:{model_id}"
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _run(self, images):
        x = torch.nn.functional.interpolate(images.float() / 255, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1)
        return self.module(pixel_values=(x - self.mean) / self.std).pooler_output, None


def load_extractor(spec: str = "inception", *, inception_weights: Path | None = None,
                   device: torch.device | str | None = None, weights_option: str = "--inception-weights",
                   probe_resolution: int | None = PROBE_RESOLUTION) -> Extractor:
    """`inception` (default), `dinov2`, `dinov2:MODEL` (hub id or folder), or a TorchScript file path, checked by
    one pass over a few images of `probe_resolution` px (`probe`; None: not checked).

    `weights_option` names where the caller's user gives `inception_weights` (an option, or a config key), for
    the messages.
    """
    extractor = _load(spec, inception_weights, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                      weights_option)
    if probe_resolution is not None:
        probe(extractor, probe_resolution)
    return extractor


def _load(spec: str, inception_weights: Path | None, device: torch.device, weights_option: str) -> Extractor:
    if spec == "inception":
        path = Path(inception_weights) if inception_weights else inception_path(weights_option)
        return InceptionExtractor(*_load_torchscript(path, "the Inception weights"), device)
    if inception_weights is not None:
        raise UserError(f"{weights_option} applies to inception features, not {spec}")
    if spec == "dinov2" or spec.startswith("dinov2:"):
        model_id = spec.partition(":")[2] or DINOV2_DEFAULT
        return Dinov2Extractor(_load_dinov2(model_id), device, model_id)
    check_judge(spec)
    path = Path(spec).expanduser()
    if spec and (path.suffix in (".pt", ".pth", ".ts", ".jit") or path.exists()):  # Path("") exists: it is "."
        return TorchScriptExtractor(*_load_torchscript(path, "the feature extractor"), device, path)
    raise UserError(f"unknown --features '{spec}': use inception, dinov2, dinov2:MODEL or a TorchScript file (.pt)")


def extract(extractor: Extractor, batches: Iterable[torch.Tensor], *, on_batch=None) -> Features:
    """Run `extractor` over uint8 batches and concatenate; `on_batch(n)` reports progress."""
    features, probs = [], []
    announce()
    for batch in batches:
        rebalance()
        f, p = extractor(batch)
        features.append(f.numpy())
        if p is not None:
            probs.append(p.numpy())
        if on_batch is not None:
            on_batch(len(batch))
    if not features:
        raise ValueError("no images to extract features from")
    return Features(np.concatenate(features), np.concatenate(probs) if len(probs) == len(features) else None)


def probe(extractor: Extractor, resolution: int) -> int:
    """One pass over PROBE_IMAGES images of `resolution` px (seeded noise), before any work: a network that fails,
    or returns what is not features, stops a command then, not after an hour of sampling or training. Returns the
    number of features per image."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    extractor(torch.randint(0, 256, (PROBE_IMAGES, 3, resolution, resolution), generator=generator,
                            dtype=torch.uint8))
    return extractor.width


def same_network(a: str, b: str) -> bool:
    """Whether two extractor names are the same network. Names that 0.1.0 wrote carried the TorchScript file's
    name (`torchscript:FILE:HASH`); the network is its content, so only the hash counts."""
    return _identity(a) == _identity(b)


def _identity(name: str) -> str:
    kind, _, rest = name.partition(":")
    return f"{kind}:{rest.rpartition(':')[2]}" if kind == "torchscript" else name


def script_error(err: BaseException, limit: int = 160) -> str:
    """What went wrong, in one line: for a TorchScript error the `SomeError: message` line that follows the
    network's source code, for others their first line."""
    lines = str(err).strip().splitlines()
    said = [m for m in map(_SCRIPT_ERROR.match, reversed(lines)) if m] if len(lines) > 1 else []
    return f"{said[0].group(1)}: {said[0].group(2)}"[:limit] if said else first_line(err, limit)


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


def _load_torchscript(path: Path, what: str) -> tuple[torch.nn.Module, str]:
    """The network in `path` and the sha256 of the very bytes it was loaded from (its name)."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist" if not path.exists() else
                        f"{what} {path} is not a file; give a TorchScript file saved with torch.jit.save")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the published networks are in it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(io.BytesIO(data), map_location="cpu").eval(), hashlib.sha256(data).hexdigest()
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


def _shape_of(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
