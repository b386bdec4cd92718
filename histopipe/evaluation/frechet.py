"""Fréchet distance between two sets of image features, in float64.

FD = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)), the squared 2-Wasserstein
distance between Gaussians fitted to the two sets (FID when the features are Inception's).

The trace term uses tr((C1 C2)^(1/2)) = sum of the singular values of C1^(1/2) C2^(1/2)
(their squares are the eigenvalues of C1 C2). Both square roots come from a symmetric
eigen-decomposition (``eigh``) with eigenvalues below the round-off level set to zero, and the
singular values need no further square root, so directions where a covariance is singular
(fewer samples than feature dimensions, the usual case for 1,000+-dim features) contribute
exactly nothing instead of sqrt(round-off) ~ 1e-8 each. The usual route,
``scipy.linalg.sqrtm(C1 @ C2)`` on a non-symmetric product, returns complex values or NaN there.

Feature means and covariances accumulate batch by batch (``RunningStats``), so the features
of a large set never need to be in memory together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histopipe.errors import HistopipeError


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and sample covariance (D, D) (divided by n - 1) of n feature vectors, float64."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


class RunningStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Batches are merged with Chan et al.'s pairwise update (each batch centred on its own mean,
    then combined with a correction for the difference of the means), which avoids the
    cancellation of the naive sum-of-squares formula when features have a large offset.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features (B, D) (any float dtype; converted to float64)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HistopipeError(f"features of shape {x.shape} do not match dimension {self.dim}")
        if not np.isfinite(x).all():
            raise HistopipeError("features contain NaN or infinite values")
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n = self.n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise HistopipeError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        cov = self._m2 / (self.n - 1)
        return GaussianStats(mean=self._mean.copy(), cov=(cov + cov.T) / 2, n=self.n)


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and covariance of features (N, D) in one go (same numbers as ``RunningStats``)."""
    x = np.asarray(features, dtype=np.float64)
    acc = RunningStats(x.shape[1])
    acc.update(x)
    return acc.stats()


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix.

    Eigenvalues within round-off of zero (below dim * eps * largest) are taken as zero: they
    cannot be told from zero, and their square roots (~1e-8) would otherwise add up."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    floor = matrix.shape[0] * np.finfo(np.float64).eps * max(float(vals.max(initial=0.0)), 0.0)
    roots = np.sqrt(np.where(vals > floor, vals, 0.0))
    return (vecs * roots) @ vecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((C1 C2)^(1/2)) for symmetric PSD C1, C2: the sum of singular values of
    C1^(1/2) C2^(1/2) (a nuclear norm, so no square root of near-zero eigenvalues)."""
    product = _psd_sqrt(cov1) @ _psd_sqrt(cov2)
    return float(np.linalg.svd(product, compute_uv=False).sum())


def frechet_distance(
    mean1: np.ndarray,
    cov1: np.ndarray,
    mean2: np.ndarray,
    cov2: np.ndarray,
    eps: float = 0.0,
) -> float:
    """Fréchet distance between N(mean1, cov1) and N(mean2, cov2), computed in float64.

    ``eps`` (>= 0) adds eps * I to both covariances (the offset other FID code adds when its
    sqrtm fails); this route needs none for singular covariances, so the default is 0.
    Returns a float >= 0 (tiny negative round-off is clipped to 0).
    """
    mu1 = np.asarray(mean1, dtype=np.float64).ravel()
    mu2 = np.asarray(mean2, dtype=np.float64).ravel()
    c1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    c2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise HistopipeError(
            f"Fréchet distance: shapes do not match: means {mu1.shape}, {mu2.shape}, "
            f"covariances {c1.shape}, {c2.shape}"
        )
    for name, arr in (("mean1", mu1), ("mean2", mu2), ("cov1", c1), ("cov2", c2)):
        if not np.isfinite(arr).all():
            raise HistopipeError(f"Fréchet distance: {name} contains NaN or infinite values")
    if eps < 0:
        raise HistopipeError(f"Fréchet distance: eps must be >= 0, got {eps}")
    if eps:
        c1 = c1 + eps * np.eye(d)
        c2 = c2 + eps * np.eye(d)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * trace_sqrt_product(c1, c2)
    return max(float(value), 0.0)


def frechet_distance_stats(a: GaussianStats, b: GaussianStats, eps: float = 0.0) -> float:
    """Fréchet distance between two fitted Gaussians (see ``frechet_distance``)."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=eps)
