"""difftool.evaluation.metrics: FID, KID, IS and precision/recall against closed forms and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg

from difftool.evaluation import metrics
from difftool.evaluation.metrics import (
    GaussianStats,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def reference_fid(mu1, sigma1, mu2, sigma2) -> float:
    """FID via Tr sqrt(S1 S2) = sum of sqrt(eigenvalues of sqrt(S1) S2 sqrt(S1)): no sqrtm of S1 S2."""
    root = psd_sqrt(sigma1)
    values = linalg.eigvalsh(root @ sigma2 @ root)
    trace_sqrt = np.sqrt(np.clip(values, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def stats(mu, sigma) -> GaussianStats:
    return GaussianStats(mu=np.asarray(mu, float), sigma=np.asarray(sigma, float), count=0)


# FID


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    s = gaussian_stats(x)
    assert s.count == 50 and s.mu.dtype == s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # sqrtm of a diagonal matrix is exact up to round-off.
    assert frechet_distance(stats(mu1, np.diag(s1)), stats(mu2, np.diag(s2))) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dim", [8, 32])
def test_fid_full_covariance_matches_eigenvalue_formula(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = random_covariance(rng, dim), random_covariance(rng, dim)
    # Two different factorisations of the same quantity agree to ~1e-12; 1e-8 leaves room.
    assert frechet_distance(stats(mu1, s1), stats(mu2, s2)) == pytest.approx(
        reference_fid(mu1, s1, mu2, s2), rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(2).normal(size=(500, 32))
    assert abs(frechet_distance(gaussian_stats(x), gaussian_stats(x))) < 1e-6


def test_fid_from_samples_approaches_the_analytic_value():
    rng = np.random.default_rng(3)
    dim, n = 8, 20000
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    s1, s2 = random_covariance(rng, dim), 2 * random_covariance(rng, dim)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = reference_fid(mu1, s1, mu2, s2)
    # Sample means and covariances carry ~1/sqrt(n) ~ 0.7% relative error, and FID is biased
    # upwards by O(D/n); 3% covers both with margin for this seed.
    assert frechet_distance(gaussian_stats(x), gaussian_stats(y)) == pytest.approx(expected, rel=0.03)


def test_fid_with_singular_covariances_is_finite_and_right():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), 2 * rng.normal(size=(12, 32)) + 1  # N < D: rank-deficient
    a, b = gaussian_stats(x), gaussian_stats(y)
    value = frechet_distance(a, b)
    assert math.isfinite(value)
    # sqrtm of the singular product is accurate to ~1e-8 relative here (checked against eigh).
    assert value == pytest.approx(reference_fid(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_fid_retries_with_eps_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(5)
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    real_sqrtm, seen = linalg.sqrtm, []

    def failing_once(matrix):
        seen.append(matrix)
        return np.full_like(matrix, np.inf) if len(seen) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", failing_once)
    value = frechet_distance(stats(mu1, s1), stats(mu2, s2))
    eps = 1e-6 * np.eye(8)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], (s1 + eps) @ (s2 + eps), rtol=1e-12)
    # The covariances in the distance itself stay unregularised: only sqrt(S1 S2) sees eps.
    shifted = reference_fid(mu1, s1 + eps, mu2, s2 + eps) - 2 * 8 * 1e-6
    assert value == pytest.approx(shifted, rel=1e-8)


def test_fid_rejects_a_large_imaginary_part():
    # A "covariance" with a negative eigenvalue makes sqrt(S1 S2) genuinely complex.
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(stats([0, 0], np.diag([1.0, -1.0])), stats([0, 0], np.eye(2)))


def test_fid_errors():
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(stats(np.zeros(3), np.eye(3)), stats(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2-D"):
        gaussian_stats(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


# KID


def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, dim = x.shape

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(dim)) / dim + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_single_subset_matches_brute_force():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.3
    # With m = len, the one subset is a permutation of each set, and MMD^2 ignores order.
    kid = kernel_inception_distance(x, y, subsets=1, subset_size=7)
    assert kid.mean == pytest.approx(brute_force_mmd2(x, y), rel=1e-10)
    assert kid.std == 0.0


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = kernel_inception_distance(x, y, subsets=50, subset_size=100)
    shifted = kernel_inception_distance(x, y + 1.0, subsets=50, subset_size=100)
    # An unbiased estimate of 0: within a few subset-stds of it.
    assert abs(same.mean) < 3 * same.std
    assert shifted.mean > 10 * shifted.std and shifted.mean > 100 * abs(same.mean)


def test_kid_is_reproducible_with_a_seed():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)) + 0.5
    first = kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3)
    assert kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3) == first
    assert kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=4) != first


def test_kid_subsets_are_drawn_from_the_whole_set():
    rng = np.random.default_rng(17)
    modes = np.concatenate([rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 2])  # sorted by mode
    mixed = np.concatenate([rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 2])[rng.permutation(200)]
    first_mode_only = kernel_inception_distance(modes[:100], mixed, subsets=20, subset_size=50)
    # Subsets taken from the head of `modes` would see only its first mode (KID ~39 here, vs ~1).
    for real, fake in [(modes, mixed), (mixed, modes)]:
        same = kernel_inception_distance(real, fake, subsets=20, subset_size=50)
        assert abs(same.mean) < 3 * same.std and abs(same.mean) < first_mode_only.mean / 10


def test_kid_errors():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="different sizes"):
        kernel_inception_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="subsets >= 1"):
        kernel_inception_distance(np.zeros((5, 4)), np.zeros((5, 4)), subsets=0)


# Inception Score


def test_is_of_uniform_probabilities_is_one():
    assert inception_score(np.full((20, 10), 0.1)).mean == pytest.approx(1.0, abs=1e-12)


def test_is_of_evenly_spread_one_hot_rows_is_the_class_count():
    probs = np.tile(np.eye(7), (4, 1))  # every split of 7 rows holds each class once
    score = inception_score(probs, splits=4)
    assert score.mean == pytest.approx(7.0, abs=1e-6)
    assert score.std == pytest.approx(0.0, abs=1e-6)


def test_is_std_over_splits():
    e = np.eye(4)
    first = e[[0, 1, 0, 1]]  # two classes evenly: IS 2
    second = e[[0, 1, 2, 3]]  # four classes evenly: IS 4
    score = inception_score(np.concatenate([first, second]), splits=2)
    # Scores 2 and 4: mean 3, population std 1 (log(0) is guarded, so one-hot rows are exact).
    assert score.mean == pytest.approx(3.0, abs=1e-6)
    assert score.std == pytest.approx(1.0, abs=1e-6)


def test_is_matches_a_loop_on_random_probabilities():
    probs = np.random.default_rng(9).dirichlet(np.full(5, 0.5), size=12)
    marginal = [sum(row[j] for row in probs) / len(probs) for j in range(5)]
    kl = [sum(p * math.log(p / q) for p, q in zip(row, marginal) if p > 0) for row in probs]
    expected = math.exp(sum(kl) / len(kl))
    assert inception_score(probs, splits=1).mean == pytest.approx(expected, rel=1e-10)


def test_is_uses_at_most_one_split_per_row():
    # 3 rows, 10 splits asked: each row is its own split, and a single row scores exactly 1.
    probs = np.random.default_rng(10).dirichlet(np.ones(4), size=3)
    score = inception_score(probs, splits=10)
    assert (score.mean, score.std) == pytest.approx((1.0, 0.0), abs=1e-12)


@pytest.mark.parametrize("probs", [np.random.default_rng(11).normal(size=(5, 3)),  # logits
                                   np.array([[1.5, -0.5], [0.5, 0.5]]),  # sums to 1, negative entry
                                   np.full((4, 3), 0.3)])  # rows sum to 0.9
def test_is_rejects_non_probabilities(probs):
    with pytest.raises(ValueError, match="not probabilities"):
        inception_score(probs)


# Precision and recall


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        out = []
        for i, p in enumerate(points):
            dists = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(dists[k - 1])
        return out

    def covered(queries, points, point_radii):
        inside = [any(np.linalg.norm(q - p) <= r for p, r in zip(points, point_radii)) for q in queries]
        return sum(inside) / len(inside)

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_pr_of_identical_sets_is_one():
    x = np.random.default_rng(12).normal(size=(40, 8))
    assert precision_recall(x, x.copy()) == metrics.PrecisionRecall(1.0, 1.0)


def test_pr_of_separated_clusters_is_zero():
    rng = np.random.default_rng(13)
    real, fake = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 100
    assert precision_recall(real, fake) == metrics.PrecisionRecall(0.0, 0.0)


def test_pr_of_a_fake_set_covering_half_the_modes():
    rng = np.random.default_rng(14)
    centres = 100 * np.eye(8)[:4]  # 4 modes, far apart compared with their unit spread
    real = np.concatenate([c + rng.normal(size=(6, 8)) for c in centres])
    # Fake: the points of the first two modes, moved 1e-3, far less than any k-NN radius (~2).
    fake = real[:12] + 1e-3 * rng.normal(size=(12, 8))
    result = precision_recall(real, fake, k=3)
    assert (result.precision, result.recall) == (1.0, 0.5)


def test_pr_matches_brute_force():
    rng = np.random.default_rng(15)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * 1.3 + 0.7
    expected = brute_force_pr(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the sets overlap partly, so the check bites
    result = precision_recall(real, fake, k=3)
    assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-12)


def test_pr_ball_boundary_counts_as_inside():
    # Integer points give exact distances: fake 3 is exactly radius 1 (k=1) from real 2.
    real, fake = np.array([[0.0], [1.0], [2.0]]), np.array([[3.0], [10.0], [11.0]])
    result = precision_recall(real, fake, k=1)
    # Fake radii are 7, 1, 1, so the ball around 3 holds every real point.
    assert (result.precision, result.recall) == (1 / 3, 1.0)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_pr_does_not_depend_on_batch_size(batch_size):
    rng = np.random.default_rng(16)
    real, fake = rng.normal(size=(60, 8)), rng.normal(size=(45, 8)) + 0.4
    whole = precision_recall(real, fake, k=5)
    assert 0 < whole.precision < 1 and 0 < whole.recall < 1
    assert precision_recall(real, fake, k=5, batch_size=batch_size) == whole


def test_pr_errors():
    x = np.zeros((5, 4))
    with pytest.raises(ValueError, match=r"smaller than both set sizes \(real 5, fake 3\)"):
        precision_recall(x, np.zeros((3, 4)), k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="different sizes"):
        precision_recall(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        precision_recall(x, x, batch_size=0)
