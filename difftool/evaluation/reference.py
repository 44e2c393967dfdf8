"""Reference statistics: what generated images are compared with, computed once and kept as `.npz`.

A reference holds the Gaussian statistics of the real images' features (mu, sigma: FID) and the
features themselves, up to MAX_STORED_FEATURES of them in float16 (KID and precision/recall need
samples, not moments). It records the feature extractor and the resolution it was made with: scores
against statistics of another network or image size mean nothing, so such a pairing is refused.

References built from a data source are cached under the data cache (`$DIFFTOOL_CACHE/stats`),
keyed by the extractor, the resolution and a hash of the decoded images, so a changed folder or
another network never reuses old statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difftool import __version__
from difftool.safeio import atomic_path
from difftool.data.cache import default_cache_dir
from difftool.errors import UserError, first_line
from difftool.evaluation.features import MAX_WIDTH, Extractor, extract, same_network
from difftool.sampling.folder import SampleFolder
from difftool.evaluation.imagesets import (
    ImageSet,
    from_data_source,
    npy_shape,
    open_images,
    open_npz,
)
from difftool.evaluation.metrics import GaussianStats, gaussian_stats
from difftool.progress import SamplingProgress

FORMAT = 1
MAX_STORED_FEATURES = 50_000
SEED = 0  # which features are kept when there are more than MAX_STORED_FEATURES
PSD_RTOL = 1e-6  # how far below 0 (relative to the largest variance) round-off may take an eigenvalue of sigma
SYMMETRY_RTOL = 1e-5


@dataclass
class Reference:
    stats: GaussianStats
    features: np.ndarray  # at most MAX_STORED_FEATURES rows, for KID and precision/recall
    extractor: str
    resolution: int
    source: str

    @property
    def count(self) -> int:
        return self.stats.count


def from_images(images: ImageSet, extractor: Extractor, *, batch_size: int) -> Reference:
    """Features of every image in `images`, summarised."""
    with SamplingProgress(images.count, label="reference features") as progress:
        found = extract(extractor, images.batches(batch_size), on_batch=progress.advance)
    kept = found.features
    if len(kept) > MAX_STORED_FEATURES:
        rows = np.sort(np.random.default_rng(SEED).choice(len(kept), MAX_STORED_FEATURES, replace=False))
        kept = kept[rows]
    return Reference(gaussian_stats(found.features), kept.astype(np.float32), extractor.name, images.resolution,
                     images.description)


def save(reference: Reference, path: Path) -> None:
    """Atomically, as an .npz that numpy alone reads (no pickles)."""
    features = reference.features
    if not len(features) or np.abs(features).max() < np.finfo(np.float16).max:  # else float16 would make them inf
        features = features.astype(np.float16)
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as f:
        np.savez(f, mu=reference.stats.mu, sigma=reference.stats.sigma, count=reference.count,
                 features=features, extractor=reference.extractor,
                 resolution=reference.resolution, source=reference.source, format=FORMAT,
                 difftool_version=__version__)


def load(path: Path) -> Reference:
    """The statistics in `path`, checked: they may come from anywhere, and a mean of the wrong length, a
    covariance that is no covariance or NaN values must stop a command with one line, never give NaN scores."""
    try:
        with open_npz(path, "statistics .npz") as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise UserError(f"{path} holds no reference statistics (mu, sigma); make them with "
                                f"difftool stats DATA --output {path.name}")
            _check_sizes(path, npz)
            stats = GaussianStats(npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64),
                                  int(npz["count"]) if "count" in npz else 0)
            features = npz["features"].astype(np.float32) if "features" in npz else np.zeros((0, len(stats.mu)), np.float32)
            extractor = str(npz["extractor"]) if "extractor" in npz else "unknown"
            resolution = int(npz["resolution"]) if "resolution" in npz else 0
            source = str(npz["source"]) if "source" in npz else str(path)
    except (KeyError, TypeError, ValueError) as err:  # arrays of the wrong kind or shape
        raise UserError(f"{path} is not a readable statistics .npz ({first_line(err, 120)}); "
                        f"make it again with difftool stats") from err
    problem = statistics_problem(stats.mu, stats.sigma, features)
    if problem:
        raise UserError(f"{path} does not hold valid statistics: {problem}; make them again with difftool stats")
    return Reference(stats, features, extractor, resolution, source)


def statistics_problem(mu: np.ndarray, sigma: np.ndarray, features: np.ndarray) -> str | None:
    """What makes (mu, sigma, features) no Gaussian statistics of features, or None: mu 1-D, sigma square of its
    size, symmetric and positive semi-definite (within round-off), features rows of that width, all finite."""
    problem = _shape_problem(mu.shape, sigma.shape, features.shape)
    if problem:
        return problem
    for name, values in (("mu", mu), ("sigma", sigma), ("features", features)):
        if not np.isfinite(values).all():
            return f"{name} holds NaN or infinite values"
    scale = max(float(np.abs(np.diag(sigma)).max()), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=SYMMETRY_RTOL, atol=SYMMETRY_RTOL * scale):
        return "sigma is not symmetric, so it is no covariance matrix"
    try:  # positive semi-definite up to round-off: positive definite once that much is added
        np.linalg.cholesky(sigma + PSD_RTOL * scale * np.eye(len(mu)))
    except np.linalg.LinAlgError:
        return "sigma is not positive semi-definite, so it is no covariance matrix"
    return None


def _shape_problem(mu: tuple, sigma: tuple, features: tuple | None) -> str | None:
    if len(mu) != 1 or not 1 <= mu[0] <= MAX_WIDTH:
        return f"mu must be a vector of 1 to {MAX_WIDTH:,} values, it has shape {mu}"
    width = mu[0]
    if tuple(sigma) != (width, width):
        return f"sigma must be {width}×{width} like the length of mu, it has shape {sigma}"
    if features is not None and (len(features) != 2 or features[1] != width or features[0] > MAX_STORED_FEATURES):
        return (f"features must be at most {MAX_STORED_FEATURES:,} rows of {width} values like mu, they have shape "
                f"{features}")
    return None


def _check_sizes(path: Path, npz) -> None:
    """The shapes of the arrays from their headers, before any is read: a small .npz can unpack to gigabytes."""
    shapes = {name: npy_shape(npz, name) for name in ("mu", "sigma", "features") if name in npz}
    problem = _shape_problem(shapes["mu"], shapes["sigma"], shapes.get("features"))
    if problem:
        raise UserError(f"{path} does not hold valid statistics: {problem}; make them again with difftool stats")


def check_compatible(reference: Reference, extractor: Extractor, resolution: int, where: str) -> None:
    """Refuse statistics that were made with another network, at another image size, or of features of another
    width than `extractor` gives (known once it has seen a batch: `features.probe`)."""
    if not same_network(reference.extractor, extractor.name):
        raise UserError(f"{where} was made with the feature extractor {reference.extractor}, these images use "
                        f"{extractor.name}: distances between features of different networks mean nothing; make the "
                        f"statistics again with the same --features (and --inception-weights)")
    if reference.resolution and reference.resolution != resolution:
        raise UserError(f"{where} was made from {reference.resolution}-px images, these are {resolution} px: FID "
                        f"depends on the resolution; make the statistics at {resolution} px "
                        f"(difftool stats DATA --resolution {resolution})")
    if extractor.width is not None and len(reference.stats.mu) != extractor.width:
        raise UserError(f"{where} holds statistics of {len(reference.stats.mu)} features per image, but "
                        f"{extractor.label} gives {extractor.width}: they cannot be compared; make the statistics "
                        f"again with difftool stats and the same --features")


def resolve(reference: str, extractor: Extractor, *, resolution: int, batch_size: int, split: str = "train",
            max_images: int | None = None) -> Reference:
    """`--reference`: a statistics .npz, an .npz of images, or a data source (name, hub id, folder), cached."""
    path = Path(reference).expanduser()
    if path.suffix == ".npz" and path.is_file() and _holds_statistics(path):
        loaded = load(path)
        check_compatible(loaded, extractor, resolution, str(path))
        return loaded
    try:
        images = images_of(reference, resolution=resolution, split=split, max_images=max_images)
    except UserError as err:
        raise UserError(f"--reference {reference}: {err}; a reference is a data set name (cifar10, mnist, shapes, a "
                        f"hub id), a folder of real images, or an .npz from difftool stats") from None
    digest = _fingerprint(images, batch_size, extractor.name, split, max_images)
    cache = default_cache_dir() / "stats" / f"{_slug(reference)}-{resolution}px-{_slug(extractor.name)}-{digest[:16]}.npz"
    with contextlib.suppress(UserError):  # an unreadable cache file is rebuilt
        if cache.is_file():
            return load(cache)
    built = from_images(images, extractor, batch_size=batch_size)
    save(built, cache)
    return built


def images_of(source: str, *, resolution: int, split: str = "train", max_images: int | None = None) -> ImageSet:
    """An .npz of images or a folder `difftool sample` wrote, as they are (samples, not their grid.png), or a
    data source as training would see it at `resolution`."""
    if not source.strip():  # Path("") is the working folder: never what an empty argument meant
        raise UserError("the data is an empty string; give a data set name, a folder of images or an .npz of images")
    if Path(source).suffix == ".npz" or SampleFolder.holds_samples(source):
        return open_images(source)
    return from_data_source(source, resolution=resolution, split=split, max_images=max_images)


def _holds_statistics(path: Path) -> bool:
    with open_npz(path) as npz:
        return "mu" in npz.files


def _fingerprint(images: ImageSet, batch_size: int, *parts) -> str:
    """sha256 over the decoded pixels and what else decides the statistics."""
    digest = hashlib.sha256(repr((FORMAT, *parts)).encode())
    for batch in images.batches(batch_size):
        digest.update(batch.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(text).name or text)[:40]
