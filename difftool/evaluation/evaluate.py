"""`difftool evaluate` as library calls: images (or a model's samples) -> features -> metrics -> files.

One pass of the feature extractor over the images gives every metric: the Fréchet distance (FID with
Inception features) and KID against the reference's statistics and features, precision/recall against
its features, and the Inception Score from the same pass's class probabilities. A model is sampled
first with `difftool.sampling.job` (the same seeds, files and resume rules as `difftool sample`); under
`accelerate launch -m difftool.evaluate` the sampling is split over the processes and the main
process scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difftool.errors import UserError
from difftool.evaluation.features import Extractor, extract, load_extractor
from difftool.evaluation.files import METRICS_FILE
from difftool.models.checkpoints import LoadedModel
from difftool.safeio import refuse_file_in_the_way, write_text
from difftool.sampling.folder import NPZ_FILE
from difftool.sampling.job import SampleRequest, SampleResult, check_request, generate, load_shared
from difftool.evaluation.imagesets import ImageSet, is_image_source, open_images, open_npz
from difftool.evaluation.judge import CLASSES, class_fidelity, fd_noise
from difftool.evaluation.metrics import (
    frechet_distance,
    gaussian_stats,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from difftool.progress import SamplingProgress
from difftool.evaluation.reference import (
    Reference,
    check_compatible,
    from_images,
    images_of,
    resolve,
    save,
)
from difftool.output_rules import UNTOUCHED, Existing, refuse_inputs_as_output, source_name
from difftool.rundir import lock_name
from difftool.runlock import main_process_lock
from difftool.threads import sharing_cores

DEFAULT_RESOLUTION = 32  # of statistics made from a data set, when no resolution is given
COMPARABLE_N = 10_000  # below this FID is biased upwards and only comparable at equal N
PR_MAX = 10_000  # precision/recall compares at most this many features of each set (k-NN is quadratic)
PR_SEED = 0


@dataclass
class MetricOptions:
    """How features are made and scored; the defaults are the literature's."""

    features: str = "inception"
    inception_weights: Path | None = None
    batch_size: int = 100
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    is_splits: int = 10
    split: str = "train"  # of a reference data set
    reference_images: int | None = None  # at most this many reference images (all by default)


@dataclass
class Evaluation:
    output: Path
    record: dict  # what metrics.json holds
    notes: list[str] = field(default_factory=list)


@sharing_cores
def evaluate(source: str, *, reference: str | None, options: MetricOptions, request: SampleRequest | None = None,
             output: Path | None = None, existing: Existing = UNTOUCHED) -> Evaluation | None:
    """Score the images at `source` (a folder or .npz), or `request.num_images` samples of the model at `source`.

    Returns None in the non-main processes of a multi-process run, which only sample.
    """
    output = Path(output) if output else default_output(source)
    what = "the image set" if is_image_source(source) else "the model"
    with evaluation_folder(output, {what: source, "the reference": reference}, existing):
        return _evaluate_into(output, source, reference, options, request, existing)


def _evaluate_into(output: Path, source: str, reference: str | None, options: MetricOptions,
                   request: SampleRequest | None, existing: Existing) -> Evaluation | None:
    if is_image_source(source):
        if not main_process():  # other processes have nothing to sample; one scores
            return None
        images = open_images(source)
        scorer = prepare_scorer(reference, options, images.resolution)
        record, notes = scorer.score(images, asked=images.asked), images.notes
    else:
        request = request or SampleRequest()
        model = load_checked(source, [request])
        scorer = prepare_scorer(reference, options, model.info["resolution"])
        done = sample_and_score(source, model, request, output / "samples", scorer, existing=existing)
        if done is None:
            return None
        record, notes = done[1], []
    write_text(output / METRICS_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")  # `score` checked
    return Evaluation(output, record, notes + record["warnings"])


@dataclass
class Scorer:
    """What every score of one evaluation or sweep shares: the feature network and the reference."""

    extractor: Extractor
    reference: Reference | None
    options: MetricOptions

    def score(self, images: ImageSet, asked: list[str | None] | None = None) -> dict:
        return score(images, self.reference, self.extractor, self.options, asked=asked)


def prepare_scorer(reference: str | None, options: MetricOptions, resolution: int) -> Scorer | None:
    """The main process's Scorer (None elsewhere), made before any sampling: missing weights or statistics of
    another resolution should stop a run before an hour of sampling, not after it."""
    if not main_process():
        return None
    extractor = checked_extractor(options, resolution)
    return Scorer(extractor, resolve_reference(reference, extractor, resolution, options), options)


def checked_extractor(options: MetricOptions, resolution: int) -> Extractor:
    """The feature network of `options`, after one pass over a few images of `resolution` (`features.probe`): one
    that fails or returns no features is refused before anything is sampled, trained or written."""
    return load_extractor(options.features, inception_weights=options.inception_weights, probe_resolution=resolution)


def sample_and_score(source: str, model: LoadedModel, request: SampleRequest, folder: Path, scorer: Scorer | None,
                     *, existing: Existing,
                     sampling_precision=contextlib.nullcontext) -> tuple[SampleResult, dict] | None:
    """One setting: sample `model` into `folder` (as `difftool sample --format npz` would) and score the samples.

    `evaluate` of a model is one call, a sweep one call per setting, training one per evaluation (sampling under
    its `sampling_precision`, its autocast: the features are always computed in fp32). None in the processes
    that only sample.
    """
    with sampling_precision():
        sampled = generate(source, dataclasses.replace(request, format="npz"), folder, existing=existing, model=model)
    if scorer is None:
        return None
    record = scorer.score(open_images(folder / NPZ_FILE), asked=asked_classes(folder, model))
    record["sampling"] = {**sampled.settings, "model_calls": sampled.model_calls}
    return sampled, record


def asked_classes(folder: Path, model: LoadedModel) -> list[str | None] | None:
    """The class each sample of `folder` (its samples.npz) was asked for, by name; None for unconditional ones."""
    names = model.info.get("label_names")
    with open_npz(folder / NPZ_FILE) as npz:
        ids = npz["arr_1"].tolist() if "arr_1" in npz and names else None
    return None if ids is None else [names[i] if 0 <= i < len(names) else None for i in ids]


def score(images: ImageSet, reference: Reference | None, extractor: Extractor, options: MetricOptions, *,
          asked: list[str | None] | None = None) -> dict:
    """Every metric the reference allows, from one pass of `extractor` over `images`.

    A judge's (evaluation/judge.py) class predictions give the class fidelity, against the classes the images were
    `asked` for where that is known, in place of the Inception Score; its FD comes with its noise."""
    with SamplingProgress(images.count, label="features") as progress:
        found = extract(extractor, images.batches(options.batch_size), on_batch=progress.advance)
    n = len(found)
    record: dict = {"num_images": n, "images": images.description, "resolution": images.resolution,
                    "features": extractor.name}
    warnings = []
    if n < COMPARABLE_N:
        warnings.append(f"N = {n} images: FID is biased upwards below {COMPARABLE_N:,} images and only comparable "
                        f"between evaluations with the same N")
    if reference is not None:
        record.update(reference=reference.source, reference_images=reference.count)
        record[distance_key(extractor)] = _distance(found.features, reference)
        if extractor.judge is not None:
            record[f"{distance_key(extractor)}_std"] = fd_noise(found.features, reference.stats)
        if len(reference.features) >= 2:
            kid = kernel_inception_distance(reference.features, found.features, subsets=options.kid_subsets,
                                            subset_size=options.kid_subset_size)
            record.update(kid_mean=kid.mean, kid_std=kid.std)
            real, fake = _subset(reference.features, PR_MAX), _subset(found.features, PR_MAX)
            if min(len(real), len(fake)) > options.pr_k:
                pr = precision_recall(real, fake, k=options.pr_k)
                record.update(precision=pr.precision, recall=pr.recall)
    else:
        warnings.append("no --reference: only the Inception Score, which needs no real images")
    if found.probs is not None and extractor.judge is not None:
        if extractor.judge["judges"] == CLASSES:
            record.update(class_fidelity(found.probs, extractor.judge["classes"], asked))
    elif found.probs is not None:
        inception = inception_score(found.probs, splits=options.is_splits)
        record.update(is_mean=inception.mean, is_std=inception.std)
    record["warnings"] = warnings
    _check_finite(record, reference)
    return record


def _distance(features: np.ndarray, reference: Reference) -> float:
    """The Fréchet distance of `features` to the reference; statistics that cannot be compared are the user's."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by `_check_finite`
            return frechet_distance(gaussian_stats(features), reference.stats)
    except ValueError as err:  # sizes that differ, or a covariance product with no real square root
        raise UserError(f"the images cannot be compared with the reference {reference.source} ({err}); make the "
                        f"statistics again with difftool stats and the same --features") from err


def _check_finite(record: dict, reference: Reference | None) -> None:
    """A score that is NaN or infinite is an error, never a number written as NaN (which is not JSON)."""
    bad = [key for key, value in record.items() if isinstance(value, float) and not np.isfinite(value)]
    if bad:
        against = f" against {reference.source}" if reference is not None else ""
        raise UserError(f"{', '.join(bad)} came out {record[bad[0]]}{against}: the features or the statistics hold "
                        f"values too large to compute with; check the feature network and make the statistics "
                        f"again with difftool stats")


@sharing_cores
def build_stats(data: str, output: Path, *, resolution: int | None, options: MetricOptions,
                overwrite: bool = False) -> Reference:
    """`difftool stats`: reference statistics of any data source `train` reads (at `resolution`, by default
    DEFAULT_RESOLUTION), or of an .npz of images or a folder `difftool sample` wrote (at their own size)."""
    output = Path(output)
    if output.suffix != ".npz":
        raise UserError(f"--output {output} must end in .npz")
    refuse_inputs_as_output(output, {"the data": data})
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the .npz file to write")
    if output.exists() and not overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    refuse_file_in_the_way(output.parent)
    # The extractor first: a wrong --features should not wait for a data set to be read.
    extractor = checked_extractor(options, resolution or DEFAULT_RESOLUTION)
    images = images_of(data, resolution=resolution or DEFAULT_RESOLUTION, split=options.split,
                       max_images=options.reference_images)
    if resolution is not None and images.resolution != resolution:  # samples are never resized: see images_of
        raise UserError(f"{data} holds {images.resolution}-px images, not {resolution} px: the statistics of "
                        f"generated images are made at their own size, and only they compare with images of it; "
                        f"drop --resolution (or give --resolution {images.resolution}), or sample at {resolution} px")
    reference = from_images(images, extractor, batch_size=options.batch_size)
    save(reference, output)
    return reference


def distance_key(extractor: Extractor) -> str:
    """fid for Inception features, fd_dinov2 for DINOv2, fd otherwise."""
    return extractor.distance_name.lower()


def default_output(source: str) -> Path:
    """evaluations/NAME (NAME: `output_rules.source_name` of the run, folder or file evaluated)."""
    return Path("evaluations") / source_name(source)


def resolve_reference(reference: str | None, extractor: Extractor, resolution: int,
                      options: MetricOptions) -> Reference | None:
    """The reference statistics for images of `resolution`, built (and cached) if they are not a file."""
    if reference is None:
        return None
    ref = resolve(reference, extractor, resolution=resolution, batch_size=options.batch_size,
                  split=options.split, max_images=options.reference_images)
    check_compatible(ref, extractor, resolution, reference)
    return ref


def load_checked(source: str, requests: list[SampleRequest]) -> LoadedModel:
    """The model, loaded once for all `requests`, which are checked against it: a bad --steps stops a run
    before reference statistics are built, not after."""
    model = load_shared(source, requests[0].weights, process_state())
    for request in requests:
        check_request(model, request, source)
    return model


@contextlib.contextmanager
def evaluation_folder(output: Path, inputs: dict, existing: Existing) -> Iterator[None]:
    """Hold the evaluation folder `output` (one evaluation at a time) after checking that it may be written."""
    refuse_file_in_the_way(output)
    refuse_inputs_as_output(output, inputs)
    with main_process_lock(process_state(), output, "evaluate"):
        held = [p for p in output.iterdir() if p.name != lock_name("evaluate")]
        if held and not (existing.overwrite or existing.resume):
            raise UserError(f"{output} already holds an evaluation; pass --overwrite to replace it, --resume to reuse "
                            f"the samples made there, or choose another --output")
        yield


def _subset(features: np.ndarray, limit: int) -> np.ndarray:
    if len(features) <= limit:
        return features
    return features[np.sort(np.random.default_rng(PR_SEED).choice(len(features), limit, replace=False))]


def process_state():
    """The processes of this run; the state is the one `generate` uses (gloo on CPU-only machines)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def main_process() -> bool:
    """Rank 0 scores."""
    return process_state().is_main_process
