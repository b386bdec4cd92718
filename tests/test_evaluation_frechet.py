"""Fréchet distance: closed forms, a high-precision reference, scipy, streaming statistics."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import scipy.linalg

from histopipe.errors import HistopipeError
from histopipe.evaluation.frechet import (
    RunningStats,
    frechet_distance,
    frechet_distance_stats,
    gaussian_stats,
    trace_sqrt_product,
)


def random_spd(rng, d, scale=1.0, rank=None):
    a = rng.normal(size=(d, rank or d + 3)) * scale
    return a @ a.T / a.shape[1]


def closed_form_commuting(mu1, a, mu2, b):
    """FD of covariances with one eigenbasis and eigenvalues a, b: |dmu|^2 + sum (√a - √b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def mp_reference(mu1, c1, mu2, c2, dps=50):
    """FD in 50-digit arithmetic with mpmath's general (non-symmetric) matrix square root."""
    with mpmath.workdps(dps):
        m1, m2 = mpmath.matrix(c1.tolist()), mpmath.matrix(c2.tolist())
        root = mpmath.sqrtm(m1 * m2)
        tr = sum(root[i, i] for i in range(len(mu1)))
        diff = sum((mpmath.mpf(x) - mpmath.mpf(y)) ** 2 for x, y in zip(mu1, mu2, strict=True))
        value = diff + sum(m1[i, i] + m2[i, i] for i in range(len(mu1))) - 2 * mpmath.re(tr)
        return float(value)


def test_identical_sets_give_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 64), (20, 64)):  # the second has singular covariances (n < d)
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + 5
        s = gaussian_stats(x)
        fd = frechet_distance_stats(s, s)
        assert 0 <= fd < 1e-8 * np.trace(s.cov)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 2
    a, b = rng.uniform(0.01, 9, d), rng.uniform(0.01, 9, d)
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(closed_form_commuting(mu1, a, mu2, b), rel=1e-12)


def test_commuting_full_covariances_match_closed_form():
    rng = np.random.default_rng(2)
    d = 24
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.001, 5, d), rng.uniform(0.001, 5, d)
    a[:4] = 0.0  # rank-deficient: the eigen route needs no offset for it
    c1, c2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    fd = frechet_distance(mu1, c1, mu2, c2)
    assert fd == pytest.approx(closed_form_commuting(mu1, a, mu2, b), rel=1e-9)


def test_one_dimensional_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9 + 1.5**2)


def test_non_commuting_covariances_match_high_precision_reference():
    rng = np.random.default_rng(3)
    for d in (3, 6):
        c1, c2 = random_spd(rng, d), random_spd(rng, d, scale=3)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ref = mp_reference(mu1, c1, mu2, c2)
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_matches_scipy_sqrtm_on_random_cases():
    rng = np.random.default_rng(4)
    for d in (8, 32, 64):
        c1, c2 = random_spd(rng, d), random_spd(rng, d, scale=0.5)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        root = scipy.linalg.sqrtm(c1 @ c2)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(root).real
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)


def test_symmetric_and_invariant_to_sample_order():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 20))
    y = rng.normal(size=(250, 20)) @ rng.normal(size=(20, 20)) * 0.3 + 1
    sx, sy = gaussian_stats(x), gaussian_stats(y)
    fd = frechet_distance_stats(sx, sy)
    assert fd > 1
    assert frechet_distance_stats(sy, sx) == pytest.approx(fd, rel=1e-10)
    shuffled = gaussian_stats(x[rng.permutation(len(x))])
    assert frechet_distance_stats(shuffled, sy) == pytest.approx(fd, rel=1e-10)


def test_sampled_gaussians_approach_closed_form():
    rng = np.random.default_rng(6)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.5, 0.0])
    c1, c2 = random_spd(rng, d), random_spd(rng, d, scale=2)
    x = rng.multivariate_normal(mu1, c1, size=n)
    y = rng.multivariate_normal(mu2, c2, size=n)
    exact = mp_reference(mu1, c1, mu2, c2)
    assert frechet_distance_stats(gaussian_stats(x), gaussian_stats(y)) == pytest.approx(exact, rel=0.02)


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(7)
    # A large common offset is where a naive sum-of-squares covariance loses its digits.
    x = (rng.normal(size=(1003, 12)) * rng.uniform(0.01, 3, 12) + 1e4).astype(np.float32)
    acc = RunningStats(12)
    start = 0
    for size in (1, 7, 64, 300, 0, 631):
        acc.update(x[start : start + size])
        start += size
    assert acc.n == len(x) == start
    streamed = acc.stats()
    ref = x.astype(np.float64)
    np.testing.assert_allclose(streamed.mean, ref.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(streamed.cov, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
    assert streamed.mean.dtype == streamed.cov.dtype == np.float64


def test_trace_sqrt_product_of_a_matrix_with_itself_is_its_trace():
    rng = np.random.default_rng(8)
    c = random_spd(rng, 10)
    assert trace_sqrt_product(c, c) == pytest.approx(np.trace(c), rel=1e-10)


def test_bad_inputs_are_reported():
    with pytest.raises(HistopipeError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(HistopipeError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    acc = RunningStats(3)
    with pytest.raises(HistopipeError, match="dimension"):
        acc.update(np.zeros((2, 4)))
    acc.update(np.zeros((1, 3)))
    with pytest.raises(HistopipeError, match="at least 2"):
        acc.stats()
