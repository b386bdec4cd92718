"""Tissue types: faiss k-means on foundation-model tile embeddings, with nested coarser levels.

Fitting never holds the cohort in memory: k-means runs on a bounded, diversity-sampled
subset (``histopipe.sampling``: at most ``per_slide_cap`` tiles per slide covering its
embedding space, at most ``total_cap`` in all), drawn either from the embedding stores, one
slide read at a time (``fit``), or from per-slide sample stores written by independent jobs
(``fit_samples``, ``histopipe.slide_samples``); both give the same model. The two-level fit
(``histopipe.summaries``) counts every sampled tile instead, in memory that does not grow
with the cohort, and writes the same model folder.

Clusters whose within-cluster variance is far above the rest (``resplit_factor`` × the
median) are split in two, and for every split the pair of clusters whose merge costs least
(Ward criterion) is merged, so k stays as configured. The k fitted types are then merged by
one count-weighted Ward tree, cut at every coarser level; one tree guarantees nesting (each
fine type lies in exactly one type of each coarser level).

A fitted model is a folder: ``centroids.npy`` (k, D) float32, ``level_luts.npy`` (L, k)
int32 (row l maps a finest type to its type at level l; row 0 is the identity) and
``model.json`` (encoder, dim, k, levels, seed, normalisation, sample sizes, per-cluster
counts and variances, re-split record).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from histopipe.atomic import atomic_path
from histopipe.errors import ConfigError, HistopipeError
from histopipe.sampling import (
    CohortSample,
    StoreInfo,
    check_compatible,
    iter_feature_blocks,
    normalize_rows,
    sample_cohort,
    store_info,
)
from histopipe.slide_samples import cohort_from_samples

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
# Clusters with fewer sampled members than this are never re-split.
MIN_RESPLIT_MEMBERS = 8
MAX_RESPLIT_ROUNDS = 5


@dataclass(frozen=True)
class ClusterConfig:
    """The ``clustering`` config section (see workflow/schemas/config.schema.yaml)."""

    k: int = 100
    levels: tuple[int, ...] = (5, 10, 20, 50, 100)
    seed: int = 0
    niter: int = 25
    per_slide_cap: int = 1000
    total_cap: int = 200_000
    normalize: str = "l2"
    resplit_factor: float = 3.0
    model: str | None = None
    workers: int = 1
    method: str = "two_level"
    batch_centroids: int = 256
    refine_passes: int = 2
    refit: bool = False
    student: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted({int(v) for v in self.levels}, reverse=True)))
        if self.k < 2:
            raise ConfigError(f"clustering.k: must be at least 2, got {self.k}")
        if self.k not in self.levels:
            raise ConfigError(f"clustering.levels {list(self.levels)} must include k = {self.k}")
        if self.levels[0] != self.k:
            raise ConfigError(f"clustering.levels {list(self.levels)}: no level may exceed k = {self.k}")
        if self.normalize not in ("l2", "none"):
            raise ConfigError(f"clustering.normalize: 'l2' or 'none', got {self.normalize!r}")
        if self.method not in ("two_level", "capped"):
            raise ConfigError(f"clustering.method: 'two_level' or 'capped', got {self.method!r}")
        if self.batch_centroids < 1 or self.refine_passes < 0:
            raise ConfigError(f"clustering.batch_centroids must be >= 1 and refine_passes >= 0, got "
                              f"{self.batch_centroids} and {self.refine_passes}")

    @property
    def spherical(self) -> bool:
        """Cosine k-means (unit-norm centroids) whenever features are L2-normalised."""
        return self.normalize == "l2"


# --- k-means, re-split, hierarchy ----------------------------------------------------------


def kmeans(
    x: np.ndarray, k: int, seed: int, niter: int, spherical: bool, init: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """faiss k-means on all rows of ``x`` (float32 (n, D)), each row counted ``weights``
    times (float (n,); None: once); centroids float32 (k, D)."""
    if len(x) < k:
        raise HistopipeError(f"k-means needs at least k = {k} sampled tiles, got {len(x)} (add slides or lower k)")
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
        # Use every sampled point: the cohort sample is already bounded by total_cap.
        max_points_per_centroid=math.ceil(len(x) / k) + 1, min_points_per_centroid=1,
    )
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    km.train(np.ascontiguousarray(x, dtype=np.float32), weights=w, init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64 (n,)) and its squared L2 distance (float32 (n,)) for each row."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), dist[:, 0]


def cluster_stats(
    x: np.ndarray, centroids: np.ndarray, weights: np.ndarray | None = None, sse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assignments (n,), member counts (k,) and within-cluster variance (k,): the mean
    squared L2 distance of members to their centroid (0 for an empty cluster).

    Rows may stand for groups of tiles (weighted sub-centroids): ``weights`` (n,) tiles per
    row and ``sse`` (n,) their summed squared distance to the row, so that counts and
    variances are those of the tiles. Without weights the counts are int64.
    """
    labels, dist = nearest(x, centroids)
    k = len(centroids)
    if weights is None:
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=dist.astype(np.float64), minlength=k)
    else:
        w = np.asarray(weights, dtype=np.float64)
        counts = np.bincount(labels, weights=w, minlength=k)
        spread = w * dist + (0.0 if sse is None else np.asarray(sse, dtype=np.float64))
        sums = np.bincount(labels, weights=spread, minlength=k)
    return labels, counts, np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def _ward_costs(c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Ward merge cost of every pair, (k, k) float64 with an infinite diagonal: the rise in
    total squared error, ``w_a w_b / (w_a + w_b) * |c_a - c_b|^2``."""
    sq = (c * c).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (c @ c.T), 0.0)
    cost = w[:, None] * w[None, :] / (w[:, None] + w[None, :]) * d2
    np.fill_diagonal(cost, np.inf)
    return cost


def _merge_cheapest(c: np.ndarray, w: np.ndarray, forbid: set[frozenset[int]]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    cost = _ward_costs(c, w)
    for pair in forbid:
        a, b = tuple(pair)
        cost[a, b] = cost[b, a] = np.inf
    a, b = (int(v) for v in np.unravel_index(np.argmin(cost), cost.shape))
    a, b = min(a, b), max(a, b)
    merged = (w[a] * c[a] + w[b] * c[b]) / (w[a] + w[b])
    keep = [i for i in range(len(c)) if i not in (a, b)]
    return np.vstack([c[keep], merged[None]]), np.concatenate([w[keep], [w[a] + w[b]]]), (a, b)


def resplit(
    x: np.ndarray, centroids: np.ndarray, factor: float, seed: int, niter: int, spherical: bool,
    max_rounds: int = MAX_RESPLIT_ROUNDS, weights: np.ndarray | None = None, sse: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Split every cluster whose within-cluster variance exceeds ``factor`` × the median,
    then merge, once per split, the pair of clusters whose merge raises the total squared
    error least (Ward). k is unchanged; the halves of one split are never merged back in
    the same round. Repeated (at most ``max_rounds``) until no cluster is flagged, since one
    split can leave a half that still holds several modes.

    Rows may be weighted sub-centroids (``weights``, ``sse`` as in ``cluster_stats``).
    Returns the new centroids (k, D) float32 and a record of every split. ``factor <= 0``
    disables the step.
    """
    events: list[dict] = []
    if factor <= 0:
        return centroids, events
    for round_ in range(max_rounds):
        labels, counts, var = cluster_stats(x, centroids, weights, sse)
        rows = np.bincount(labels, minlength=len(centroids))  # a split needs two rows to share
        median = float(np.median(var[counts > 0])) if (counts > 0).any() else 0.0
        flagged = [int(t) for t in np.argsort(-var)
                   if var[t] > factor * median and counts[t] >= MIN_RESPLIT_MEMBERS and rows[t] >= 2]
        if not flagged:
            break
        events += [{"round": round_, "split": t, "variance": float(var[t]), "median_variance": median,
                    "members": int(counts[t])} for t in flagged]
        centroids = _split_and_merge(x, centroids, labels, counts, flagged, seed + round_, niter, spherical, weights)
    return centroids, events


def _split_and_merge(
    x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, counts: np.ndarray, flagged: list[int],
    seed: int, niter: int, spherical: bool, weights: np.ndarray | None = None,
) -> np.ndarray:
    kept = [t for t in range(len(centroids)) if t not in flagged]
    c = [centroids[kept].astype(np.float64)]
    w = [counts[kept].astype(np.float64)]
    forbid: set[frozenset[int]] = set()
    at = len(kept)
    for t in flagged:
        members = x[labels == t]
        mw = None if weights is None else weights[labels == t]
        halves = kmeans(members, 2, seed + t, niter, spherical, weights=mw)
        sub, _ = nearest(members, halves)
        c.append(halves.astype(np.float64))
        w.append(np.bincount(sub, weights=mw, minlength=2).astype(np.float64))
        forbid.add(frozenset((at, at + 1)))
        at += 2
    c_all, w_all = np.vstack(c), np.maximum(np.concatenate(w), 1.0)
    for _ in flagged:
        c_all, w_all, pair = _merge_cheapest(c_all, w_all, forbid)
        # Merging renumbers clusters: shift the protected pairs accordingly.
        forbid = {frozenset(i - sum(p < i for p in pair) for i in fs) for fs in forbid if not (fs & set(pair))}
    out = c_all.astype(np.float32)
    if spherical:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out)


def ward_level_luts(centroids: np.ndarray, weights: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Cut one count-weighted Ward tree over the k centroids at every level.

    ``levels`` descending with ``levels[0] == k``. Returns int32 (L, k): row l maps each fine
    type to its type at level l, numbered 0..levels[l]-1 in order of their smallest fine type.
    Nesting holds by construction: every level is a coarsening of the previous one.
    """
    k = len(centroids)
    levels = list(levels)
    if levels != sorted(set(levels), reverse=True) or levels[0] != k or levels[-1] < 1:
        raise ConfigError(f"levels {levels} must be distinct, descending, start with k = {k} and be >= 1")
    c = centroids.astype(np.float64).copy()
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1.0)
    group = np.arange(k)
    cost = _ward_costs(c, w)
    alive = np.ones(k, dtype=bool)
    luts = np.empty((len(levels), k), dtype=np.int32)
    for li, target in enumerate(levels):
        while alive.sum() > target:
            a, b = (int(v) for v in np.unravel_index(np.argmin(cost), cost.shape))
            a, b = min(a, b), max(a, b)
            c[a] = (w[a] * c[a] + w[b] * c[b]) / (w[a] + w[b])
            w[a] += w[b]
            group[group == b] = a
            alive[b] = False
            cost[b, :] = cost[:, b] = np.inf
            d2 = ((c - c[a]) ** 2).sum(axis=1)
            new = w * w[a] / (w + w[a]) * d2
            new[~alive] = np.inf
            new[a] = np.inf
            cost[a, :] = cost[:, a] = new
        _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int32)
        rank[np.argsort(first)] = np.arange(len(first), dtype=np.int32)
        luts[li] = rank[inverse]
    return luts


# --- the model -----------------------------------------------------------------------------


@dataclass
class ClusterModel:
    """Fitted tissue types: centroids, the level LUTs and metadata (see module docstring)."""

    centroids: np.ndarray  # (k, D) float32
    level_luts: np.ndarray  # (L, k) int32
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def levels(self) -> list[int]:
        return [int(v) for v in self.meta["levels"]]

    @property
    def normalize(self) -> str:
        return str(self.meta["normalize"])

    def assign(self, features: np.ndarray) -> np.ndarray:
        """Tissue type of each row of ``features`` (N, D) at every level: int64 (N, L),
        column 0 the finest level (0..k-1), column l the type at ``levels[l]``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise HistopipeError(f"features of shape {features.shape} do not match the model's dim {self.dim}")
        fine, _ = nearest(normalize_rows(features, self.normalize), self.centroids)
        return self.level_luts[:, fine].T.astype(np.int64)

    def assign_store(self, path: str | Path) -> np.ndarray:
        """``assign`` over an embedding store, streamed in row blocks: int64 (N, L)."""
        info = store_info(path)
        self.check_store(info)
        out = np.empty((info.n, len(self.levels)), dtype=np.int64)
        for start, block in iter_feature_blocks(path, "none"):
            out[start : start + len(block)] = self.assign(block)
        return out

    def check_store(self, info: StoreInfo) -> None:
        """Refuse a store from another encoder than the model was fitted on."""
        enc = self.meta.get("encoder")
        if info.dim != self.dim or (enc is not None and info.attrs.get("encoder") not in (None, enc)):
            raise HistopipeError(
                f"{info.path}: encoder {info.attrs.get('encoder')!r} dim {info.dim} does not match the "
                f"cluster model (encoder {enc!r}, dim {self.dim})"
            )

    def label_luts(self) -> np.ndarray:
        """int32 (L, k + 1): finest *label* (0 background, t + 1 type t) to each level's label."""
        luts = np.zeros((len(self.levels), self.k + 1), dtype=np.int32)
        luts[:, 1:] = self.level_luts + 1
        return luts

    def label_names(self) -> list[str]:
        """Label value -> name for the finest level (0 is background)."""
        return ["background", *[f"type {t}" for t in range(self.k)]]

    @property
    def model_id(self) -> str:
        """A short hash of the tissue types (centroids and level LUTs): maps, datasets and
        trained pipelines record it, so that reusing a model can be checked."""
        from histopipe.label_space import cluster_model_id

        return cluster_model_id(self.centroids, self.level_luts)

    def save(self, folder: str | Path) -> None:
        """Write the model folder atomically."""
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            np.save(tmp / "centroids.npy", self.centroids.astype(np.float32))
            np.save(tmp / "level_luts.npy", self.level_luts.astype(np.int32))
            (tmp / "model.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ClusterModel:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "model.json").read_text())
            centroids = np.load(folder / "centroids.npy")
            luts = np.load(folder / "level_luts.npy")
        except (OSError, ValueError) as err:
            raise HistopipeError(f"{folder}: not a cluster model folder (model.json, centroids.npy, level_luts.npy): {err}") from None
        if meta.get("format") != MODEL_FORMAT or luts.shape != (len(meta["levels"]), len(centroids)):
            raise HistopipeError(f"{folder}: unsupported or inconsistent cluster model (format {meta.get('format')})")
        return cls(np.ascontiguousarray(centroids, dtype=np.float32), luts.astype(np.int32), meta)


def fit(paths: Sequence[str | Path], cfg: ClusterConfig) -> ClusterModel:
    """Fit tissue types on a diversity-sampled subset of the cohort's embedding stores."""
    return fit_sample(sample_cohort(paths, cfg.per_slide_cap, cfg.total_cap, cfg.seed, cfg.normalize, cfg.workers), cfg)


def fit_samples(paths: Sequence[str | Path], cfg: ClusterConfig) -> ClusterModel:
    """Fit tissue types from per-slide sample stores (``histopipe sample-embeddings``),
    reading each slide's prefix of its quota; the embedding stores are not opened."""
    return fit_sample(cohort_from_samples(paths, cfg.per_slide_cap, cfg.total_cap, cfg.seed, cfg.normalize), cfg)


def fit_points(
    x: np.ndarray, cfg: ClusterConfig, weights: np.ndarray | None = None, sse: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """k-means and re-split on rows ``x`` (float32 (n, D)), optionally weighted sub-centroids
    (``weights``, ``sse`` as in ``cluster_stats``): centroids (k, D), the re-split record and
    the per-cluster variance before the re-split."""
    centroids = kmeans(x, cfg.k, cfg.seed, cfg.niter, cfg.spherical, weights=weights)
    _, _, var_before = cluster_stats(x, centroids, weights, sse)
    centroids, events = resplit(x, centroids, cfg.resplit_factor, cfg.seed, cfg.niter, cfg.spherical,
                                weights=weights, sse=sse)
    if events:
        log.info("re-split %d high-variance cluster(s); refining", len(events))
        centroids = kmeans(x, cfg.k, cfg.seed, max(1, cfg.niter // 2), cfg.spherical, init=centroids, weights=weights)
    return centroids, events, var_before


def fit_sample(sample: CohortSample, cfg: ClusterConfig) -> ClusterModel:
    """k-means, re-split and Ward levels on a cohort sample; the model records its sizes."""
    shared = check_compatible(sample.stores)
    x = sample.features
    log.info("k-means: %d sampled tiles from %d slides, D=%d, k=%d", len(x), len(sample.stores), x.shape[1], cfg.k)
    centroids, events, var_before = fit_points(x, cfg)
    _, counts, var = cluster_stats(x, centroids)
    luts = ward_level_luts(centroids, counts, cfg.levels)
    meta = {
        "format": MODEL_FORMAT,
        **shared,
        "k": cfg.k,
        "levels": list(cfg.levels),
        "seed": cfg.seed,
        "niter": cfg.niter,
        "normalize": cfg.normalize,
        "spherical": cfg.spherical,
        "resplit_factor": cfg.resplit_factor,
        "per_slide_cap": cfg.per_slide_cap,
        "total_cap": cfg.total_cap,
        "n_sampled": int(len(x)),
        "n_slides": len(sample.stores),
        "n_tiles_total": int(sum(i.n for i in sample.stores)),
        "sampled_per_slide": {i.slide_id: int(q) for i, q in zip(sample.stores, sample.quotas, strict=True)},
        "cluster_counts": counts.astype(int).tolist(),
        "cluster_variance": [round(float(v), 6) for v in var],
        "max_variance_before_resplit": float(var_before.max()),
        "resplit": events,
        "config": config_record(cfg),
    }
    return ClusterModel(centroids, luts, meta)


def config_record(cfg: ClusterConfig) -> dict:
    """The clustering settings as the model records them (JSON types)."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "student"}))
