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

The balls assume independent samples. Patches cut with a stride smaller than their size are
not: on the quality run's test slide (stride 1/4 of the patch) a patch overlaps a median of 33
others, and 4.9 of its 5 nearest neighbours in feature space are shifted copies of itself, so
the radii measure the distance to those copies, not the spread of the tissue. Given the
samples' ``Footprints`` (slide, level-0 window), a radius is the distance to the k-th nearest
sample whose window does not overlap its own; synthetic samples made from overlapping (or the
same) source maps are treated alike, unconditional ones (independent draws) are not. Rows
with fewer than k such samples keep the plain radius and are counted. (Requiring the k
neighbours to be independent of each other too was tried: on a test slide of ~25
non-overlapping windows the balls then grow so large that test patches blurred by 1 px score
precision 0.96; this estimator keeps them at 0.27, the plain one at 0.)

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
    # Radii that skip overlapping samples (Footprints given), and the rows that had too few
    # non-overlapping samples and kept the plain radius.
    independent_real: bool = False
    independent_synthetic: bool = False
    radius_fallback_real: int = 0
    radius_fallback_synthetic: int = 0

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


@dataclass(frozen=True)
class Footprints:
    """Where each of N samples was cut: ``slide`` (N,) ids, ``xy`` (N, 2) level-0 top-left
    corners, ``side`` (N,) window sides in level-0 px. Two samples overlap when they come from
    one slide and their square windows intersect; every sample overlaps itself."""

    slide: np.ndarray
    xy: np.ndarray
    side: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.slide)
        if np.shape(self.xy) != (n, 2) or np.shape(self.side) != (n,):
            raise HistopipeError(f"footprints: slide {np.shape(self.slide)}, xy {np.shape(self.xy)}, side {np.shape(self.side)} disagree")
        object.__setattr__(self, "xy", np.asarray(self.xy, np.float64))
        object.__setattr__(self, "side", np.asarray(self.side, np.float64))
        object.__setattr__(self, "code", np.unique(np.asarray(self.slide).astype(str), return_inverse=True)[1].ravel())

    def __len__(self) -> int:
        return len(self.slide)

    def overlaps(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """(stop - start, N) bool: row i of the chunk overlaps sample j."""
        code = torch.as_tensor(self.code, device=device)
        xy = torch.as_tensor(self.xy, device=device)
        side = torch.as_tensor(self.side, device=device)
        reach = torch.maximum(side[start:stop, None], side[None, :])
        near = ((xy[start:stop, None, :] - xy[None, :, :]).abs() < reach[..., None]).all(-1)
        return near & (code[start:stop, None] == code[None, :])


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024, footprints: Footprints | None = None) -> torch.Tensor:
    """Distance (N,) from each row to its k-th nearest other row (the row itself excluded;
    with ``footprints``, every row whose window overlaps its own excluded)."""
    return _knn_sq_radii(features, k, chunk, footprints)[0].sqrt()


def _knn_sq_radii(features: torch.Tensor, k: int, chunk: int, footprints: Footprints | None = None) -> tuple[torch.Tensor, int]:
    """Squared radii (N,) and the number of rows that fell back to the plain radius."""
    # Kept squared: a square root and back would not return the exact value compared with.
    n = features.shape[0]
    if n <= k:
        raise HistopipeError(f"need more than k={k} samples for k-NN radii, have {n}")
    if footprints is not None and len(footprints) != n:
        raise HistopipeError(f"{len(footprints)} footprints for {n} feature rows")
    out = torch.empty(n, dtype=torch.float64, device=features.device)
    fallback = 0
    for start in range(0, n, chunk):
        rows = features[start : start + chunk]
        sq = _sq_distances(rows, features)
        # The k+1 nearest include the row itself (as in the reference code); recompute those
        # candidates exactly and take the (k+1)-th smallest.
        nearest = sq.topk(k + 1, dim=1, largest=False).indices
        exact = _exact_sq(rows[:, None, :], features[nearest])
        plain = exact.sort(dim=1).values[:, k]
        if footprints is None:
            out[start : start + chunk] = plain
            continue
        # The k nearest among the rows whose windows do not overlap this one (itself included).
        masked = sq.masked_fill(footprints.overlaps(start, start + len(rows), features.device), float("inf"))
        vals, nearest = masked.topk(k, dim=1, largest=False)
        exact = _exact_sq(rows[:, None, :], features[nearest]).masked_fill(vals.isinf(), float("inf"))
        radius = exact.sort(dim=1).values[:, k - 1]
        short = radius.isinf()
        fallback += int(short.sum())
        out[start : start + chunk] = torch.where(short, plain, radius)
    return out, fallback


def prdc(
    real: np.ndarray | torch.Tensor,
    synthetic: np.ndarray | torch.Tensor,
    k: int = 5,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
    real_footprints: Footprints | None = None,
    synthetic_footprints: Footprints | None = None,
) -> ManifoldMetrics:
    """Precision, recall, density, coverage of ``synthetic`` (M, D) against ``real`` (N, D).
    Footprints of a set make its radii skip overlapping samples (module docstring)."""
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
    real_sq, real_fallback = _knn_sq_radii(r, k, chunk, real_footprints)
    syn_sq, syn_fallback = _knn_sq_radii(s, k, chunk, synthetic_footprints)

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
        independent_real=real_footprints is not None,
        independent_synthetic=synthetic_footprints is not None,
        radius_fallback_real=real_fallback,
        radius_fallback_synthetic=syn_fallback,
    )
