"""Diversity sampling of a cohort's embedding stores, one slide at a time.

Embedding stores (contract #2) are read lazily: shapes and attributes from metadata,
features streamed in row blocks through dask. Each slide is sampled on its own
(``sample_slide``): up to ``per_slide_cap`` tiles chosen to cover its embedding space
(k-means, k-means++ seeded, with that many centroids in a seeded random projection, then the
tile nearest each centroid), put in *priority order* by farthest-point traversal so that
every prefix is itself a covering subset. A cohort-wide cap then scales every slide's quota
down proportionally (``slide_quotas``) and each slide contributes the prefix of its sample
of that length: the cohort sample is bounded by the cap, whatever the cohort's size, and the
per-slide step can run as one independent job per slide (``histopipe.slide_samples``).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import faiss
import numpy as np
import zarr

from histopipe.errors import HistopipeError

log = logging.getLogger(__name__)

# Rows read per block when streaming a slide's features (≈ 6 MB at D = 1536, float32).
BLOCK_ROWS = 4096
# Diversity sampling works in a random projection of this many dimensions: distances are
# nearly preserved (Johnson–Lindenstrauss) and the per-slide k-means becomes ~25x cheaper
# than in a 1536-dim space, which matters when thousands of slides are sampled in turn.
SAMPLE_DIM = 64
# Points per centroid for the per-slide sampling k-means, and its iterations (few are
# needed after k-means++ seeding: the point is coverage, not a converged clustering).
SAMPLE_POINTS_PER_CENTROID = 20
SAMPLE_NITER = 5
# Farthest-point traversal reads distances from the Gram matrix of the sample when it is
# at most this many rows (64 MB float32): ~10x faster than one mat-vec per step.
GRAM_MAX_ROWS = 4096


# --- reading embedding stores ------------------------------------------------------------


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    slide_id: str
    n: int
    dim: int
    attrs: dict


def store_info(path: str | Path) -> StoreInfo:
    """Shape and attributes of an embedding store (contract #2), without reading features."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        features = group["features"]
    except Exception as err:  # zarr raises several types for a missing/corrupt store
        raise HistopipeError(f"{path}: not a readable embedding store (zarr group with 'features'): {err}") from None
    attrs = dict(group.attrs)
    if features.ndim != 2:
        raise HistopipeError(f"{path}: 'features' must be 2-D (N, D), got shape {features.shape}")
    return StoreInfo(path, str(attrs.get("slide_id", path.name.removesuffix(".zarr"))), int(features.shape[0]), int(features.shape[1]), attrs)


def normalize_rows(x: np.ndarray, how: str) -> np.ndarray:
    """``x`` as float32 (N, D); rows scaled to unit L2 norm when ``how == "l2"``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if how == "l2":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.maximum(norms, 1e-12)
    return x


def _features(path: Path) -> da.Array:
    return da.from_zarr(zarr.open_group(path, mode="r")["features"])


def iter_feature_blocks(path: str | Path, normalize: str, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` with float32 (≤ block_rows, D) blocks of a store's features."""
    x = _features(Path(path))
    for start in range(0, x.shape[0], block_rows):
        block = x[start : start + block_rows].compute(scheduler="synchronous")
        yield start, normalize_rows(block, normalize)


def read_rows(path: str | Path, rows: np.ndarray, normalize: str) -> np.ndarray:
    """Selected rows (sorted int indices) of a store's features, float32 (len(rows), D)."""
    if len(rows) == 0:
        return np.zeros((0, store_info(path).dim), dtype=np.float32)
    x = _features(Path(path))[np.asarray(rows, dtype=np.int64)]
    return normalize_rows(x.compute(scheduler="synchronous"), normalize)


# --- sampling ----------------------------------------------------------------------------


def slide_quotas(counts: Sequence[int], per_slide_cap: int, total_cap: int) -> np.ndarray:
    """Tiles to sample per slide: ``min(n, per_slide_cap)``, scaled down proportionally
    (largest remainders first) so that the sum never exceeds ``total_cap``."""
    quota = np.minimum(np.asarray(counts, dtype=np.int64), per_slide_cap)
    total = int(quota.sum())
    if total <= total_cap:
        return quota
    exact = quota * (total_cap / total)
    out = np.floor(exact).astype(np.int64)
    spare = total_cap - int(out.sum())
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:spare]] += 1
    return out


def _slide_seed(seed: int, slide_id: str) -> int:
    # Independent of the order in which slides are listed, stable across runs and machines.
    return (zlib.crc32(slide_id.encode()) ^ (seed * 2654435761)) % (2**31 - 1)


def diversity_sample(path: str | Path, m: int, seed: int, normalize: str = "l2") -> np.ndarray:
    """Indices (sorted, int64) of ``m`` tiles of one slide that cover its embedding space.

    k-means (k-means++ seeded) with ``m`` centroids on the slide's features, in a seeded
    random projection to SAMPLE_DIM dimensions, then the tile nearest each centroid; slots left by centroids that
    share a nearest tile are filled at random. All tiles are taken when ``m >= n``.
    Deterministic for a given seed. Memory: the projected features (n × 64 float32).
    """
    info = store_info(path)
    n, dim = info.n, info.dim
    if m >= n:
        return np.arange(n, dtype=np.int64)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    proj = None
    if dim > SAMPLE_DIM:
        proj = rng.standard_normal((dim, SAMPLE_DIM)).astype(np.float32) / math.sqrt(SAMPLE_DIM)
    z = np.empty((n, min(dim, SAMPLE_DIM)), dtype=np.float32)
    for start, block in iter_feature_blocks(path, normalize):
        z[start : start + len(block)] = block @ proj if proj is not None else block
    n_train = min(n, m * SAMPLE_POINTS_PER_CENTROID)
    train = z[np.sort(rng.choice(n, n_train, replace=False))]
    km = faiss.Kmeans(
        z.shape[1], m, niter=SAMPLE_NITER, seed=int(rng.integers(2**31 - 1)), verbose=False,
        max_points_per_centroid=SAMPLE_POINTS_PER_CENTROID + 1, min_points_per_centroid=1,
    )
    km.train(train, init_centroids=train[kmeans_pp_seeds(train, m, rng)])
    index = faiss.IndexFlatL2(z.shape[1])
    index.add(z)
    _, nearest = index.search(km.centroids, 1)
    chosen = np.unique(nearest[:, 0])
    chosen = chosen[chosen >= 0]
    if len(chosen) < m:
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, m - len(chosen), replace=False)])
    return np.sort(chosen).astype(np.int64)


def kmeans_pp_seeds(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: ``m`` row indices of ``x``, each drawn with probability
    proportional to its squared distance to the seeds so far. Unlike faiss's uniform
    initialisation, rare but distinct modes get a seed with high probability."""
    n = len(x)
    x = np.asarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x)  # |x|^2 once: each step is then one mat-vec product
    seeds = np.empty(m, dtype=np.int64)
    seeds[0] = rng.integers(n)
    d2 = np.maximum(sq + sq[seeds[0]] - 2 * (x @ x[seeds[0]]), 0).astype(np.float64)
    for j in range(1, m):
        cum = np.cumsum(d2)
        if cum[-1] <= 0:  # fewer distinct points than seeds: fill with unused rows
            rest = np.setdiff1d(np.arange(n), seeds[:j])
            seeds[j:] = rng.choice(rest, m - j, replace=False)
            break
        seeds[j] = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1)
        np.minimum(d2, np.maximum(sq + sq[seeds[j]] - 2 * (x @ x[seeds[j]]), 0), out=d2)
    return seeds


def priority_order(x: np.ndarray) -> np.ndarray:
    """Farthest-point traversal of the rows of ``x`` (float32 (m, D)): a permutation
    (int64 (m,)) whose every prefix covers the rows well.

    Starts at the row nearest the mean (a typical tile, the best single representative),
    then repeatedly takes the row farthest from those taken so far (greedy max-min
    distance, a 2-approximation of the best q-point cover for every prefix length q). Ties
    go to the lowest row, so the order is deterministic. Cost O(m² D).
    """
    m = len(x)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    gram = x @ x.T if m <= GRAM_MAX_ROWS else None
    sq = np.einsum("ij,ij->i", x, x)
    mean = x.mean(axis=0)
    order = np.empty(m, dtype=np.int64)
    j = int(np.argmin(sq - 2 * (x @ mean)))
    d2 = np.full(m, np.inf, dtype=np.float32)
    for i in range(m):
        order[i] = j
        dots = gram[j] if gram is not None else x @ x[j]
        np.minimum(d2, np.maximum(sq + sq[j] - 2 * dots, 0), out=d2)
        d2[j] = -1.0  # taken rows stay below every distance
        j = int(np.argmax(d2))
    return order


@dataclass
class SlideSample:
    """One slide's diversity sample in priority order (``priority_order``)."""

    rows: np.ndarray  # (m,) int64 rows of the slide's embedding store
    features: np.ndarray  # (m, D) float32, normalised
    info: StoreInfo  # the slide's embedding store
    raw: np.ndarray | None = None  # (m, D) as the store holds them (float16), when read from one


def sample_slide(path: str | Path, per_slide_cap: int, seed: int, normalize: str = "l2") -> SlideSample:
    """Diversity-sample ``min(n, per_slide_cap)`` tiles of one slide, in priority order.

    ``seed`` is the cohort seed; the slide's own seed derives from it and the slide id, so
    a slide is sampled alike whether alone or in a cohort, in any order. Memory: the
    projected features (n × 64 float32) and the sample (m × D float32).
    """
    info = store_info(path)
    rows = diversity_sample(path, min(info.n, per_slide_cap), _slide_seed(seed, info.slide_id), normalize)
    raw = read_rows(path, rows, "none")
    features = normalize_rows(raw.copy(), normalize)
    order = priority_order(features)
    dtype = zarr.open_group(Path(path), mode="r")["features"].dtype
    return SlideSample(rows[order], np.ascontiguousarray(features[order]), info, np.ascontiguousarray(raw[order].astype(dtype)))


def _sample_prefix(args: tuple[str, int, int, int, str]) -> tuple[np.ndarray, np.ndarray]:
    path, quota, cap, seed, normalize = args
    if quota == 0:  # nothing to take: the slide is not read
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    s = sample_slide(path, cap, seed, normalize)
    return s.rows[:quota], s.features[:quota]


@dataclass
class CohortSample:
    """The sampled features and where each row came from."""

    features: np.ndarray  # (n, D) float32
    slide_index: np.ndarray  # (n,) int32 index into ``stores``
    rows: np.ndarray  # (n,) int64 row in that slide's store
    stores: list[StoreInfo]  # one per slide, ordered by slide id; ``n`` = the slide's tiles
    quotas: np.ndarray  # (n_slides,) int64


def check_compatible(infos: Sequence[StoreInfo]) -> dict:
    """All stores must come from one encoder (same name and dim); return shared attrs."""
    if not infos:
        raise HistopipeError("no embedding stores given")
    ref = infos[0]
    for info in infos[1:]:
        if info.dim != ref.dim or info.attrs.get("encoder") != ref.attrs.get("encoder"):
            raise HistopipeError(
                f"{info.path}: encoder {info.attrs.get('encoder')!r} dim {info.dim} differs from "
                f"{ref.path}: encoder {ref.attrs.get('encoder')!r} dim {ref.dim}; one model needs one encoder"
            )
    return {"encoder": ref.attrs.get("encoder"), "dim": ref.dim, "tiling": ref.attrs.get("tiling"),
            "weights_sha256": ref.attrs.get("weights_sha256")}


def check_unique_slides(infos: Sequence[StoreInfo]) -> None:
    ids = [i.slide_id for i in infos]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise HistopipeError(f"slide ids appear in more than one input: {dup[:5]}")


def assemble(
    infos: Sequence[StoreInfo], quotas: np.ndarray, prefixes: Iterator[tuple[np.ndarray, np.ndarray]],
) -> CohortSample:
    """Stack each slide's prefix (rows, features) into one cohort sample, in slide order;
    memory: the cohort sample only (sum of quotas × D float32)."""
    dim = infos[0].dim
    features = np.empty((int(quotas.sum()), dim), dtype=np.float32)
    slide_index = np.empty(len(features), dtype=np.int32)
    rows = np.empty(len(features), dtype=np.int64)
    at = 0
    for s, (r, x) in enumerate(prefixes):
        if len(r) != quotas[s]:
            raise HistopipeError(f"{infos[s].path}: {len(r)} sampled rows for a quota of {quotas[s]}")
        if len(r):  # an empty slide contributes nothing (and its features may be (0, 0))
            features[at : at + len(r)] = x
            slide_index[at : at + len(r)] = s
            rows[at : at + len(r)] = r
            at += len(r)
        if (s + 1) % 100 == 0:
            log.info("sampled %d/%d slides (%d tiles)", s + 1, len(infos), at)
    return CohortSample(features, slide_index, rows, list(infos), quotas)


def sample_cohort(
    paths: Sequence[str | Path], per_slide_cap: int, total_cap: int, seed: int = 0, normalize: str = "l2", workers: int = 1,
) -> CohortSample:
    """Diversity-sample every slide (``sample_slide``) and keep the prefix of its quota
    (``slide_quotas``), reading one slide at a time (``workers`` processes in parallel).

    The same sample as ``histopipe.slide_samples.cohort_from_samples`` over the slides'
    sample stores made with the same settings. Slides are ordered by slide id, so the
    result does not depend on the order of ``paths``.
    """
    infos = sorted((store_info(p) for p in paths), key=lambda i: i.slide_id)
    check_compatible(infos)
    check_unique_slides(infos)
    quotas = slide_quotas([i.n for i in infos], per_slide_cap, total_cap)
    jobs = [(str(i.path), int(q), per_slide_cap, seed, normalize) for i, q in zip(infos, quotas, strict=True)]
    if workers <= 1:
        return assemble(infos, quotas, map(_sample_prefix, jobs))
    # spawn, not fork: faiss's OpenMP runtime is not safe to use in a forked child.
    threads = max(1, faiss.omp_get_max_threads() // workers)  # no oversubscription
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=faiss.omp_set_num_threads, initargs=(threads,)) as pool:
        return assemble(infos, quotas, pool.map(_sample_prefix, jobs, chunksize=4))
