"""The judge: a small network trained on a run's own images, whose features measure how close samples are to them.

The FID's Inception network needs a download and knows ImageNet, not a user's letters or shapes. The judge
needs neither: before the first training step it learns the run's data in about a minute on a CPU, and its
64 pooled features give a Fréchet distance that sees the domain (FD_judge), next to the floor that distance
has between two sets of real images of the same size.

- Data with classes (class subfolders, a label column): the judge is a classifier of those classes. Its
  predictions say which class a sample looks like: the share of samples in the class they were asked for
  (right class) and the largest share any one class takes (one class for everything is mode collapse).
- Data without classes: the judge learns to tell which of four quarter turns an image was given (Gidaris et
  al. 2018): to do that it must see what is upright in the data, so its features follow shape, layout and
  orientation. It cannot say which kind of object a sample is, so there is no right-class figure; and on data
  that looks alike at every turn (textures, objects at any rotation) it learns little, which its held-out
  accuracy shows (chance is 25%) and the evaluation says.

It is saved as TorchScript (RUN/eval/judge.pt), the format `--features FILE` takes: uint8 N×3×H×W images of
any size in (resized to the judge's own), features and class probabilities out. Its `info` attribute (JSON)
names it a judge and lists its classes, so `difftool evaluate --features RUN/eval/judge.pt` reports the same
figures as the evaluation during training.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from difftool.errors import UserError
from difftool.evaluation.metrics import frechet_distance, gaussian_stats
from difftool.progress import SamplingProgress
from difftool.threads import rebalance

KIND = "difftool-judge"  # what `info` says: a judge's features and predictions, not just any network
CLASSES, TURNS = "classes", "quarter turns"  # what a judge was trained to tell apart
TURN_NAMES = ["0°", "90°", "180°", "270°"]
MIN_IMAGES = 200  # fewer than this and 10% held out says nothing about the judge's accuracy
MIN_PER_CLASS = 20  # of each class, so that the held-out tenth holds about two
MIN_RESOLUTION = 8  # three 2x poolings leave one pixel
HELD_OUT = 0.1  # of the images, never trained on: the judge's accuracy and the real side of the floor
# (16, 32, 64) trains 2.5x faster than (32, 64, 64) on a CPU: 0.06 s a step at 32 px on 2 cores, a minute in all
BATCH, LR, WIDTHS = 64, 3e-3, (16, 32, 64)
EPOCHS, MIN_STEPS, MAX_STEPS = 6, 300, 1000
MIN_MIRROR_DROP = 0.05  # of the held-out images, lost to mirroring: the classes have a handedness (has_handedness)
BOOTSTRAP, BOOTSTRAP_SEED = 20, 0  # resamples for the noise of an FD_judge


class _Judge(torch.nn.Module):
    """A CNN of three 3x3 conv pairs with GroupNorm, pooled to WIDTHS[-1] features, and a linear head."""

    def __init__(self, classes: int, resolution: int, info: str):
        super().__init__()
        layers, width = [], 3
        for out in WIDTHS:
            layers += [torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU(),
                       torch.nn.Conv2d(out, out, 3, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU(),
                       torch.nn.AvgPool2d(2)]
            width = out
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, classes)
        self.resolution = resolution
        self.info = info

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features of uint8 N×C×H×W images (gray is seen as gray RGB; other sizes are resized, antialiased)."""
        x = images.float() / 127.5 - 1.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2] != self.resolution or x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bilinear", align_corners=False,
                              antialias=True)
        return self.body(x).mean(dim=[2, 3])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        return features, torch.softmax(self.head(features), dim=1)


@dataclass
class JudgeReport:
    """How a judge was made and how well it does on real images it never saw."""

    kind: str  # CLASSES or TURNS
    classes: list[str]
    accuracy: float  # on the held-out images
    held_out: int
    trained_on: int
    seconds: float
    # A classifier trained without flips: its accuracy on the same held-out images mirrored, and whether the drop
    # says the classes have a handedness (letters, digits) that random flips would teach the model to break.
    mirrored_accuracy: float | None = None
    handed: bool | None = None

    def describe(self) -> str:
        what = (f"a {len(self.classes)}-class classifier" if self.kind == CLASSES
                else "a network that tells quarter turns apart (the data has no classes)")
        text = (f"{what}, {self.accuracy:.1%} right on {self.held_out:,} held-out images "
                f"(chance {1 / len(self.classes):.0%})")
        if self.mirrored_accuracy is not None:
            text += f", {self.mirrored_accuracy:.1%} on them mirrored"
        return text


def judgeable(count: int, labels: torch.Tensor | None, names: list[str] | None, resolution: int) -> str | None:
    """Why a judge cannot be trained on this data (None: it can)."""
    if resolution < MIN_RESOLUTION:
        return f"the judge needs images of at least {MIN_RESOLUTION} px, these are {resolution} px"
    if count < MIN_IMAGES:
        return f"the judge needs at least {MIN_IMAGES} images to train on and hold some out, the data has {count}"
    if labels is not None and names is not None and len(names) > 1:
        counts = torch.bincount(labels, minlength=len(names))
        fewest = int(counts.argmin())
        if counts[fewest] < MIN_PER_CLASS:
            return (f"the judge needs at least {MIN_PER_CLASS} images of each class, class '{names[fewest]}' has "
                    f"{int(counts[fewest])}")
    return None


def held_out_split(count: int, floor_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows, training rows) of `count` images: a tenth, or up to a quarter when the floor needs more.

    The held-out rows come in a random order, so that the first n of them are a fair draw of the data: files
    are read class by class, and the first n rows in file order would be the first classes only."""
    held = max(round(count * HELD_OUT), min(floor_images, count // 4))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:held], order[held:].sort().values


def reference_rows(rows: torch.Tensor, limit: int | None, seed: int = 0) -> torch.Tensor:
    """At most `limit` of `rows` (a seeded choice, in order): the images whose statistics are the reference."""
    if limit is None or limit >= len(rows):
        return rows
    return rows[torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False)))]


def train_judge(images: torch.Tensor, labels: torch.Tensor | None, names: list[str] | None, *, held: torch.Tensor,
                train: torch.Tensor, flips: bool, seed: int = 0) -> tuple[torch.jit.ScriptModule, JudgeReport]:
    """A judge of uint8 N×C×H×W `images`, trained on rows `train`, its accuracy measured on rows `held`.

    With labels and two or more `names` it learns the classes, else the quarter turns. `flips`: mirrored
    images count as the same class (as they do for a model trained with random flips); without, a classifier
    also measures what mirroring costs it (`JudgeReport.handed`).
    """
    start = time.perf_counter()
    by_class = labels is not None and names is not None and len(names) > 1
    kind, classes = (CLASSES, list(names)) if by_class else (TURNS, TURN_NAMES)
    resolution = images.shape[-1]
    info = json.dumps({"kind": KIND, "judges": kind, "classes": classes, "resolution": resolution})
    torch.manual_seed(seed)
    judge = _Judge(len(classes), resolution, info)
    generator = torch.Generator().manual_seed(seed)
    steps = min(MAX_STEPS, max(MIN_STEPS, EPOCHS * len(train) // BATCH))
    optimizer = torch.optim.AdamW(judge.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps)
    with SamplingProgress(steps, label="judge", unit="steps") as progress:
        for _ in range(steps):
            rebalance()
            rows = train[torch.randint(len(train), (BATCH,), generator=generator)]
            x, y = _examples(images[rows], labels[rows] if by_class else None, generator, flips)
            loss = F.cross_entropy(judge.logits(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.advance(1)
    judge.eval()
    mirrored = handed = None
    if by_class:
        right = _right(judge, images[held], labels[held])
        accuracy = right.float().mean().item()
        if not flips:
            mirrored_right = _right(judge, images[held].flip(-1), labels[held])
            mirrored, handed = mirrored_right.float().mean().item(), has_handedness(right, mirrored_right)
    else:
        accuracy = _turns_accuracy(judge, images[held])
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; `--features FILE` takes it
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(judge)
    report = JudgeReport(kind, classes, accuracy, len(held), len(train), time.perf_counter() - start, mirrored, handed)
    return scripted, report


def _examples(images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
              flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: the images and their classes, or each image given a random quarter turn and its number."""
    if flips:
        mirror = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    if labels is not None:
        return images, labels
    turns = torch.randint(4, (len(images),), generator=generator)
    return torch.stack([torch.rot90(x, int(k), dims=(1, 2)) for x, k in zip(images, turns)]), turns


def _turns_accuracy(judge: _Judge, images: torch.Tensor) -> float:
    """Every held-out image at each of the four turns: the share whose turn the judge names."""
    labels = torch.arange(4).repeat_interleave(len(images))
    turned = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return _right(judge, turned, labels).float().mean().item()


@torch.inference_mode()
def _right(judge: _Judge, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: whether the judge names its label."""
    return torch.cat([judge.logits(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)]) == labels


def has_handedness(right: torch.Tensor, mirrored_right: torch.Tensor) -> bool:
    """Whether mirroring the held-out images costs a classifier trained without flips more than MIN_MIRROR_DROP
    of them and more than three times the noise of that paired difference (the images it gets right one way
    only: a sign test). Shapes at any rotation and photographs lose nothing; letters and digits do."""
    lost = int((right & ~mirrored_right).sum())
    gained = int((~right & mirrored_right).sum())
    return lost - gained > max(MIN_MIRROR_DROP * len(right), 3 * math.sqrt(lost + gained))


def save_judge(module: torch.jit.ScriptModule) -> bytes:
    """The TorchScript file's bytes (written by the caller, atomically)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def judge_info(module: torch.nn.Module) -> dict | None:
    """What a TorchScript network says it judges (its `info`), or None when it is not a difftool judge."""
    try:
        info = json.loads(module.info)
    except (AttributeError, TypeError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("kind") != KIND or info.get("judges") not in (CLASSES, TURNS):
        return None
    classes = info.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return None
    return info


# ---------------------------------------------------------------- what the figures mean


def fd_noise(features: np.ndarray, reference, seed: int = BOOTSTRAP_SEED) -> float:
    """How much the FD of `features` to `reference` (GaussianStats) moves with the draw of the images: its standard
    deviation over bootstrap resamples. Two evaluations whose FDs differ by less are not told apart."""
    rng = np.random.default_rng(seed)
    spread = [frechet_distance(gaussian_stats(features[rng.integers(0, len(features), len(features))]), reference)
              for _ in range(BOOTSTRAP)]
    return float(np.std(spread))


def paired_fd_noise(a: np.ndarray, b: np.ndarray, reference, seed: int = BOOTSTRAP_SEED) -> float:
    """How much the difference FD(a) - FD(b) moves with the draw of the images, where row i of `a` and of `b` come
    from the same starting noise (two evaluations of one run: the same seeds): the standard deviation of that
    difference over bootstrap resamples that draw the same rows from both. The shared noise cancels, so this is
    far smaller than either FD's own noise, and it is what tells two evaluations apart."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, len(a), len(a))
        differences.append(frechet_distance(gaussian_stats(a[rows]), reference)
                           - frechet_distance(gaussian_stats(b[rows]), reference))
    return float(np.std(differences))


def class_fidelity(probs: np.ndarray, classes: list[str], asked: list[str | None] | None) -> dict:
    """right_class (share of samples predicted as the class they were asked for, where every one was asked for
    a class the judge knows) and largest_class_share (the most common predicted class's share)."""
    predicted = probs.argmax(1)
    out = {"largest_class_share": float(np.bincount(predicted, minlength=len(classes)).max() / len(predicted))}
    if asked is not None and len(asked) == len(predicted) and all(a in classes for a in asked):
        wanted = np.array([classes.index(a) for a in asked])
        out["right_class"] = float((predicted == wanted).mean())
    return out


def check_judge(spec: str) -> None:
    """`--features judge` alone: a judge belongs to a run."""
    if spec == "judge":
        raise UserError("--features judge: a judge is trained with a run (eval.features: judge); give its file, "
                        "RUN/eval/judge.pt")
