"""The math of generative-model metrics: FID, KID, Inception Score, and precision/recall.

This is the one place these formulas live. The functions take features (or class probabilities)
that are already arrays; extracting them from images, loading the feature network and reading or
writing reference statistics happen elsewhere, so everything here is pure and checkable against
closed forms. We write the math ourselves rather than call torch-fidelity or torchmetrics because
both tie it to their own feature extractors and input pipelines.

Everything is computed in float64: FID subtracts traces of similar size and KID averages
kernel values that mostly cancel, so float32 loses digits that matter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

FID_EPS = 1e-6  # added to both covariances when sqrt(S_a S_b) fails, as pytorch-fid does
MAX_IMAG = 1e-3  # a larger imaginary part in sqrt(S_a S_b) means the statistics are broken
PROB_ATOL = 1e-3  # how far a row of probabilities may sum from 1 (softmax in float16 is ~1e-3 off)


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set: all FID needs, and what reference statistics store."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased covariance (ddof=1)
    count: int  # number of feature rows the statistics came from


@dataclass(frozen=True)
class MeanStd:
    """A metric averaged over subsets or splits, with the (population, ddof=0) std over them."""

    mean: float
    std: float


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision and recall, both in [0, 1]."""

    precision: float  # fraction of generated samples that look real
    recall: float  # fraction of real samples the generator covers


def _features(name: str, x: np.ndarray, *, min_rows: int = 2) -> np.ndarray:
    """`x` as a finite float64 (N, D) array with N >= min_rows, or a ValueError naming `name`."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features); got shape {x.shape}")
    if len(x) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"real and fake features have different sizes ({a.shape[1]} vs {b.shape[1]}); "
                         "extract both with the same feature network")


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of (N, D) features, N >= 2, in float64."""
    x = _features("features", features)
    mu = x.mean(axis=0)
    centred = x - mu
    return GaussianStats(mu=mu, sigma=centred.T @ centred / (len(x) - 1), count=len(x))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # With fewer samples than features the product is singular and scipy warns that the root may
    # be inaccurate; its trace is still right there, and the caller checks for inf/NaN itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two Gaussians: the FID when both come from Inception features.

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)). The value is not clamped: round-off can
    make the distance between (near-)identical statistics a tiny negative number, returned as is.
    """
    mu_a, mu_b = np.asarray(a.mu, np.float64), np.asarray(b.mu, np.float64)
    sigma_a, sigma_b = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
    dim = len(mu_a)
    if mu_a.shape != (dim,) or sigma_a.shape != (dim, dim):
        raise ValueError(f"statistics are inconsistent: mu {mu_a.shape}, sigma {sigma_a.shape}")
    if mu_b.shape != mu_a.shape or sigma_b.shape != sigma_a.shape:
        raise ValueError(f"statistics have different feature sizes ({dim} vs {len(mu_b)}); "
                         "compute both with the same feature network")
    covmean = _sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = FID_EPS * np.eye(dim)
        covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > MAX_IMAG:
            raise ValueError(f"sqrt(S_a S_b) has an imaginary part of {imag:.3g}: the covariances are "
                             "not valid (symmetric positive semi-definite) covariance matrices")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3; x, y are (m, D)."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> MeanStd:
    """KID (Binkowski et al. 2018): unbiased MMD^2 averaged over random subsets.

    Each subset takes m = min(subset_size, len(real), len(fake)) rows of each set without
    replacement, drawn from one generator seeded by `seed`, so a call is reproducible. Unlike
    FID the estimate is unbiased, so it can be slightly negative for matching distributions.
    """
    x, y = _features("real", real), _features("fake", fake)
    _same_width(x, y)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2; got {subsets} and {subset_size}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        values.append(_unbiased_mmd2(x[rng.choice(len(x), m, replace=False)],
                                     y[rng.choice(len(y), m, replace=False)]))
    return MeanStd(mean=float(np.mean(values)), std=float(np.std(values)))


def inception_score(probs: np.ndarray, *, splits: int = 10) -> MeanStd:
    """Inception Score (Salimans et al. 2016) of (N, K) class probabilities (softmax outputs).

    The rows are cut into `splits` consecutive parts (fewer if N < splits); each part scores
    exp(mean KL(p(y|x) || p(y))) with p(y) the part's mean. Ranges from 1 to K.
    """
    p = _features("probs", probs, min_rows=1)
    if splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1, atol=PROB_ATOL):
        raise ValueError("probs are not probabilities: each row must be non-negative and sum to 1 "
                         "(pass softmax outputs, not logits)")
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        marginal = part.mean(axis=0)
        # xlogy gives 0 log 0 = 0; p(y) > 0 wherever p(y|x) > 0, since it is their mean.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return MeanStd(mean=float(np.mean(scores)), std=float(np.std(scores)))


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _smallest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values of each row (all of them if the row is shorter), ascending."""
    return dist.topk(min(k, dist.shape[1]), dim=1, largest=False).values


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row, in batch_size^2 blocks."""
    radii = torch.empty(len(x), dtype=x.dtype)
    blocks = _blocks(len(x), batch_size)
    for rows in blocks:
        nearest = torch.empty(rows.stop - rows.start, 0, dtype=x.dtype)  # the k smallest so far
        for cols in blocks:
            dist = torch.cdist(x[rows], x[cols])
            if cols == rows:
                dist.fill_diagonal_(torch.inf)  # a point is not its own neighbour
            nearest = torch.cat([nearest, _smallest(dist, k)], dim=1)
            nearest = _smallest(nearest, k)
        radii[rows] = nearest[:, k - 1]
    return radii


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3,
                     batch_size: int = 10000) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls around its points, each reaching the point's k-th
    nearest neighbour in the same set. Precision is the fraction of fake points inside the real
    manifold, recall the fraction of real points inside the fake one. Distances are computed in
    batch_size x batch_size blocks (float64: about 1 GB at the default), so memory does not grow
    with the set sizes.
    """
    x, y = _features("real", real), _features("fake", fake)
    _same_width(x, y)
    if not 1 <= k < min(len(x), len(y)):
        raise ValueError(f"k must be >= 1 and smaller than both set sizes (real {len(x)}, fake {len(y)}); "
                         f"got k={k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    real_radii = _kth_neighbour_radii(x, k, batch_size)
    fake_radii = _kth_neighbour_radii(y, k, batch_size)
    fake_inside = torch.zeros(len(y), dtype=torch.bool)
    real_inside = torch.zeros(len(x), dtype=torch.bool)
    # One pass over the fake x real distances answers both questions.
    for f in _blocks(len(y), batch_size):
        for r in _blocks(len(x), batch_size):
            dist = torch.cdist(y[f], x[r])
            fake_inside[f] |= (dist <= real_radii[r]).any(dim=1)
            real_inside[r] |= (dist <= fake_radii[f, None]).any(dim=0)
    return PrecisionRecall(precision=fake_inside.double().mean().item(),
                           recall=real_inside.double().mean().item())
