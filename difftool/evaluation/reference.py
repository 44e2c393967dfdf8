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
from difftool.training.data.cache import default_cache_dir
from difftool.errors import UserError, first_line
from difftool.evaluation.features import Extractor, extract
from difftool.evaluation.imagesets import ImageSet, from_data_source, is_sample_folder, open_images, open_npz
from difftool.evaluation.metrics import GaussianStats, gaussian_stats
from difftool.progress import SamplingProgress
from difftool.rundir import atomic_path

FORMAT = 1
MAX_STORED_FEATURES = 50_000
SEED = 0  # which features are kept when there are more than MAX_STORED_FEATURES


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


def from_images(images: ImageSet, extractor: Extractor, *, batch_size: int, show_progress: bool = True) -> Reference:
    """Features of every image in `images`, summarised."""
    with SamplingProgress(images.count, enabled=show_progress, label="reference features") as progress:
        found = extract(extractor, images.batches(batch_size), on_batch=progress.advance)
    kept = found.features
    if len(kept) > MAX_STORED_FEATURES:
        rows = np.sort(np.random.default_rng(SEED).choice(len(kept), MAX_STORED_FEATURES, replace=False))
        kept = kept[rows]
    return Reference(gaussian_stats(found.features), kept.astype(np.float32), extractor.name, images.resolution,
                     images.description)


def save(reference: Reference, path: Path) -> None:
    """Atomically, as an .npz that numpy alone reads (no pickles)."""
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as f:
        np.savez(f, mu=reference.stats.mu, sigma=reference.stats.sigma, count=reference.count,
                 features=reference.features.astype(np.float16), extractor=reference.extractor,
                 resolution=reference.resolution, source=reference.source, format=FORMAT,
                 difftool_version=__version__)


def load(path: Path) -> Reference:
    try:
        with open_npz(path, "statistics .npz") as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise UserError(f"{path} holds no reference statistics (mu, sigma); make them with "
                                f"difftool stats DATA --output {path.name}")
            stats = GaussianStats(npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64),
                                  int(npz["count"]) if "count" in npz else 0)
            features = npz["features"].astype(np.float32) if "features" in npz else np.zeros((0, len(stats.mu)), np.float32)
            extractor = str(npz["extractor"]) if "extractor" in npz else "unknown"
            resolution = int(npz["resolution"]) if "resolution" in npz else 0
            source = str(npz["source"]) if "source" in npz else str(path)
    except (KeyError, TypeError) as err:  # arrays of the wrong kind or shape
        raise UserError(f"{path} is not a readable statistics .npz ({first_line(err, 120)}); "
                        f"make it again with difftool stats") from err
    return Reference(stats, features, extractor, resolution, source)


def check_compatible(reference: Reference, extractor: Extractor, resolution: int, where: str) -> None:
    """Refuse statistics that were made with another network or at another image size."""
    if reference.extractor != extractor.name:
        raise UserError(f"{where} was made with the feature extractor {reference.extractor}, these images use "
                        f"{extractor.name}: distances between features of different networks mean nothing; make the "
                        f"statistics again with the same --features (and --inception-weights)")
    if reference.resolution and reference.resolution != resolution:
        raise UserError(f"{where} was made from {reference.resolution}-px images, these are {resolution} px: FID "
                        f"depends on the resolution; make the statistics at {resolution} px "
                        f"(difftool stats DATA --resolution {resolution})")


def resolve(reference: str, extractor: Extractor, *, resolution: int, batch_size: int, split: str = "train",
            max_images: int | None = None, show_progress: bool = True) -> Reference:
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
    built = from_images(images, extractor, batch_size=batch_size, show_progress=show_progress)
    save(built, cache)
    return built


def images_of(source: str, *, resolution: int, split: str = "train", max_images: int | None = None) -> ImageSet:
    """An .npz of images or a folder `difftool sample` wrote, as they are (samples, not their grid.png), or a
    data source as training would see it at `resolution`."""
    if not source.strip():  # Path("") is the working folder: never what an empty argument meant
        raise UserError("the data is an empty string; give a data set name, a folder of images or an .npz of images")
    if Path(source).suffix == ".npz" or is_sample_folder(source):
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
