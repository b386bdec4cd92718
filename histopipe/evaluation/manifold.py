"""Precision, recall, density and coverage of synthetic features against real ones.

The k-nearest-neighbour manifold metrics of Naeem et al. 2020 ("Reliable fidelity and
diversity metrics for generative models"), with the same definitions and strict inequalities
as their reference implementation. Each real sample i owns a ball of radius r_i = distance to
its k-th nearest real neighbour (itself excluded); likewise each synthetic sample j owns s_j.

- precision: fraction of synthetic samples inside at least one real ball (fidelity).
- recall: fraction of real samples inside at least one synthetic ball (diversity).
- density: (1/k) * mean over synthetic samples of the number of real balls containing it
  (1 on average when both sets come from one distribution; it rewards samples near dense
  real regions and is not capped at 1).
- coverage: fraction of real balls that contain at least one synthetic sample.

Distances are Euclidean, in float64, in row chunks with torch (memory O(chunk * N); the full
N x M matrix is never held). They come from the fast matrix-product expansion, whose rounding
depends on how rows are chunked; so that a point at exactly a ball's radius (duplicates, grid
data) is judged the same way everywhere, squared distances within rounding of a radius, and
the radii themselves, are recomputed exactly from coordinate differences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from histopipe.errors import HistopipeError


@dataclass(frozen=True)
class ManifoldMetrics:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    n_real: int
    n_synthetic: int

    def to_dict(self) -> dict:
        return asdict(self)


# Bound on the relative rounding of the expansion for feature dimensions up to ~10^4.
_ROUNDING = 1e-11


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances (len(a), len(b)) by the expansion |a|^2 - 2 a.b + |b|^2 (clamped)."""
    sq = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return sq.clamp_min_(0.0)


def _exact_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances of row pairs (a[i], b[i]) from coordinate differences."""
    return ((a - b) ** 2).sum(-1)


def _settle_ties(sq, a, b, thresholds):
    """Recompute exactly the entries of ``sq`` (from ``_sq_distances(a, b)``) that lie within
    rounding of ``thresholds`` (broadcastable squared radii), so comparisons with them hold."""
    # One tolerance per chunk (from the largest norms) is looser than per pair, which only
    # means a few more exact recomputations.
    scale = float((a * a).sum(1).max()) + float((b * b).sum(1).max())
    near = (sq - thresholds).abs() <= _ROUNDING * scale
    if near.any():
        i, j = near.nonzero(as_tuple=True)
        sq = sq.clone()
        sq[i, j] = _exact_sq(a[i], b[j])
    return sq


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance (N,) from each row to its k-th nearest other row (the row itself excluded)."""
    return _knn_sq_radii(features, k, chunk).sqrt()


def _knn_sq_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # Kept squared: a square root and back would not return the exact value compared with.
    n = features.shape[0]
    if n <= k:
        raise HistopipeError(f"need more than k={k} samples for k-NN radii, have {n}")
    out = torch.empty(n, dtype=torch.float64, device=features.device)
    for start in range(0, n, chunk):
        rows = features[start : start + chunk]
        # The k+1 nearest include the row itself (as in the reference code); recompute those
        # candidates exactly and take the (k+1)-th smallest.
        nearest = _sq_distances(rows, features).topk(k + 1, dim=1, largest=False).indices
        exact = _exact_sq(rows[:, None, :], features[nearest])
        out[start : start + chunk] = exact.sort(dim=1).values[:, k]
    return out


def prdc(
    real: np.ndarray | torch.Tensor,
    synthetic: np.ndarray | torch.Tensor,
    k: int = 5,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> ManifoldMetrics:
    """Precision, recall, density, coverage of ``synthetic`` (M, D) against ``real`` (N, D)."""
    if k < 1:
        raise HistopipeError(f"k must be >= 1, got {k}")
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    s = torch.as_tensor(np.asarray(synthetic), dtype=torch.float64, device=device)
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1]:
        raise HistopipeError(
            f"real {tuple(r.shape)} and synthetic {tuple(s.shape)} features must be (N, D) with one D"
        )
    if not (torch.isfinite(r).all() and torch.isfinite(s).all()):
        raise HistopipeError("features contain NaN or infinite values")
    real_sq = _knn_sq_radii(r, k, chunk)
    syn_sq = _knn_sq_radii(s, k, chunk)

    n, m = r.shape[0], s.shape[0]
    precise = torch.zeros(m, dtype=torch.bool, device=r.device)
    balls_hit = torch.zeros(m, dtype=torch.float64, device=r.device)
    recalled = torch.zeros(n, dtype=torch.bool, device=r.device)
    nearest_syn = torch.full((n,), float("inf"), dtype=torch.float64, device=r.device)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        rows = s[start:stop]
        sq = _sq_distances(rows, r)  # (chunk, N): synthetic rows, real columns
        sq = _settle_ties(sq, rows, r, real_sq[None, :])
        sq = _settle_ties(sq, rows, r, syn_sq[start:stop, None])
        inside_real = sq < real_sq[None, :]
        precise[start:stop] = inside_real.any(dim=1)
        balls_hit[start:stop] = inside_real.sum(dim=1, dtype=torch.float64)
        recalled |= (sq < syn_sq[start:stop, None]).any(dim=0)
        nearest_syn = torch.minimum(nearest_syn, sq.min(dim=0).values)
    return ManifoldMetrics(
        precision=float(precise.double().mean()),
        recall=float(recalled.double().mean()),
        density=float(balls_hit.mean() / k),
        coverage=float((nearest_syn < real_sq).double().mean()),
        k=int(k),
        n_real=int(n),
        n_synthetic=int(m),
    )
