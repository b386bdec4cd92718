"""Hallucination flagging (the paper's "conservative flagging").

Each synthetic image is scored by its distance, in an encoder's feature space, to the nearest
real tiles (mean over the ``k`` nearest, exact faiss search). It is flagged when the score
exceeds a quantile of the same score computed for the real tiles against each other
(leave-one-out), i.e. when it lies farther from the real data than almost any real tile does.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from histopipe.errors import HistopipeError


def _prepare(x: np.ndarray, normalize: bool, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise HistopipeError(f"{what} features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise HistopipeError(f"{what} features contain NaN or inf")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def knn_distance(query: np.ndarray, reference: np.ndarray, k: int = 1, exclude_self: bool = False) -> np.ndarray:
    """Mean Euclidean distance (N,) from each query row to its ``k`` nearest reference rows.

    ``exclude_self`` (query is reference) skips each row's own match (leave-one-out).
    """
    extra = 1 if exclude_self else 0
    if len(reference) < k + extra:
        raise HistopipeError(f"{len(reference)} reference rows are too few for k={k}" + (" (leave-one-out)" if extra else ""))
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference)
    dist2, ids = index.search(query, k + extra)
    if exclude_self:
        own = ids == np.arange(len(query))[:, None]
        # Duplicates may return another row first: drop exactly one match per row, the own
        # index when present, else the last (farthest) one.
        drop = np.where(own.any(1), own.argmax(1), k)
        keep = np.ones_like(own)
        keep[np.arange(len(query)), drop] = False
        dist2 = dist2[keep].reshape(len(query), k)
    return np.sqrt(np.maximum(dist2, 0)).mean(axis=1)


@dataclass(frozen=True)
class Flags:
    """scores (N,) distance to the real data; threshold; flagged (N,) bool."""

    scores: np.ndarray
    threshold: float
    flagged: np.ndarray
    real_scores: np.ndarray


def flag_hallucinations(
    synthetic: np.ndarray,
    real: np.ndarray,
    k: int = 1,
    quantile: float = 0.95,
    normalize: bool = True,
) -> Flags:
    """Score synthetic features (N, D) against real features (M, D) and flag the outliers."""
    syn = _prepare(synthetic, normalize, "synthetic")
    ref = _prepare(real, normalize, "real")
    if syn.shape[1] != ref.shape[1]:
        raise HistopipeError(f"feature widths differ: synthetic {syn.shape[1]}, real {ref.shape[1]}")
    if not 0 <= quantile <= 1:
        raise HistopipeError(f"flag quantile must lie in [0, 1], got {quantile}")
    real_scores = knn_distance(ref, ref, k, exclude_self=True)
    threshold = float(np.quantile(real_scores, quantile))
    scores = knn_distance(syn, ref, k)
    return Flags(scores=scores, threshold=threshold, flagged=scores > threshold, real_scores=real_scores)
