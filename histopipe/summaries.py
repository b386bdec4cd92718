"""Two-level fit of tissue types: every sampled tile counts, in memory that does not grow
with the cohort.

Level one, one job per batch of slides (``histopipe summarize-samples``): every sampled
tile of the batch's sample stores (``histopipe.slide_samples``) is summarised by k-means
into at most ``batch_centroids`` weighted sub-centroids, each with its member count and the
members' summed squared distance to it (so that counts and variances of the tiles survive).
A batch with no more sampled tiles than ``batch_centroids`` keeps the tiles themselves
(weight 1): its summary is *exact*.

Level two, the cohort job (``histopipe fit-clusters --summaries``): k-means and re-split on
the weighted sub-centroids of all batches, then ``refine_passes`` Lloyd passes that stream
every sampled tile from the sample stores, a block at a time, and a last pass for the
counts and variances that weight the Ward levels. At most ``total_cap`` sub-centroids are
held at once: past that, those held are summarised again into ``total_cap / 2``. When every
summary is exact and nothing was summarised again, the global k-means has seen every tile,
no pass is needed, and the model equals the one-level fit (``clustering.fit_sample``) on
the whole sample.

Memory of the cohort job: ``total_cap × D × 4`` bytes of sub-centroids at most, the k × D
sums, two blocks of tiles and the metadata of each slide's sample store. The model folder
is the one-level fit's (``ClusterModel``), with the two-level record in ``model.json``.

A summary store is a zarr v3 group: ``centroids`` float32 (m, D), ``weights`` float64
(m,) tiles per row, ``sse`` float64 (m,); attrs: encoder, dim, tiling, weights_sha256,
per_slide_cap, seed, normalize, batch_centroids, niter, slides (ids), n_sampled (tiles
summarised), empty_slides (slides without sampled tiles, e.g. failed tiling), exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import zarr

from histopipe.atomic import atomic_path
from histopipe.clustering import (
    MODEL_FORMAT,
    ClusterConfig,
    ClusterModel,
    cluster_stats,
    config_record,
    fit_points,
    kmeans,
    nearest,
    ward_level_luts,
)
from histopipe.errors import HistopipeError
from histopipe.sampling import check_compatible
from histopipe.slide_samples import SampleInfo, iter_sample_blocks, open_samples

log = logging.getLogger(__name__)

# Lloyd steps of the per-batch k-means: a summary needs coverage, not convergence; the
# cohort job's passes over every tile do the refining.
SUMMARY_NITER = 10
# Settings a summary must share with the fit that reads it.
SUMMARY_SETTINGS = ("per_slide_cap", "seed", "normalize", "batch_centroids")


@dataclass
class Summary:
    """Weighted sub-centroids of one batch (layout in the module docstring)."""

    centroids: np.ndarray  # (m, D) float32
    weights: np.ndarray  # (m,) float64, tiles per row
    sse: np.ndarray  # (m,) float64, members' summed squared distance to their row
    attrs: dict


def reduce_rows(
    x: np.ndarray, weights: np.ndarray | None, sse: np.ndarray | None, m: int, cfg: ClusterConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summarise (weighted) rows into at most ``m`` weighted sub-centroids: centroids
    float32 (≤ m, D), weights and sse float64; empty sub-centroids are dropped."""
    c = kmeans(x, m, cfg.seed, SUMMARY_NITER, cfg.spherical, weights=weights)
    labels, d2 = nearest(x, c)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    spread = w * d2 + (0.0 if sse is None else np.asarray(sse, dtype=np.float64))
    w_out = np.bincount(labels, weights=w, minlength=m)
    sse_out = np.bincount(labels, weights=spread, minlength=m)
    keep = w_out > 0
    return np.ascontiguousarray(c[keep]), w_out[keep], sse_out[keep]


def summarize_batch(paths: Sequence[str | Path], cfg: ClusterConfig) -> Summary:
    """Summarise one batch's sample stores (every sampled row) into weighted sub-centroids.

    Memory: the batch's sampled tiles (sum of m × D float32). A batch whose slides have no
    sampled tiles (failed tiling, no tissue) gives an empty summary and a warning.
    """
    samples = open_samples(paths, cfg.per_slide_cap, cfg.seed, cfg.normalize)
    infos = [s.store for s in samples]
    shared = check_compatible(infos)
    x = np.empty((sum(s.m for s in samples), shared["dim"]), dtype=np.float32)
    at = 0
    for block in iter_sample_blocks(samples):
        x[at : at + len(block)] = block
        at += len(block)
    empty = [s.store.slide_id for s in samples if s.m == 0]
    exact = len(x) <= cfg.batch_centroids
    if not len(x):
        log.warning("no sampled tiles in this batch (slides %s: failed tiling or no tissue); its summary is empty", empty)
        c, w, sse = x, np.zeros(0), np.zeros(0)
    elif exact:
        c, w, sse = x, np.ones(len(x)), np.zeros(len(x))
    else:
        c, w, sse = reduce_rows(x, None, None, cfg.batch_centroids, cfg)
    attrs = {**shared, "per_slide_cap": cfg.per_slide_cap, "seed": cfg.seed, "normalize": cfg.normalize,
             "batch_centroids": cfg.batch_centroids, "niter": SUMMARY_NITER, "slides": [i.slide_id for i in infos],
             "n_sampled": int(len(x)), "empty_slides": empty, "exact": bool(exact)}
    return Summary(c, w, sse, attrs)


def write_summary(out: str | Path, summary: Summary) -> None:
    """Write a summary store atomically."""
    m, dim = summary.centroids.shape
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.create_array("centroids", data=summary.centroids.astype(np.float32), chunks=(max(1, m), dim))
        root.create_array("weights", data=summary.weights.astype(np.float64), chunks=(max(1, m),))
        root.create_array("sse", data=summary.sse.astype(np.float64), chunks=(max(1, m),))
        root.attrs.update(summary.attrs)


def read_summary(path: str | Path) -> Summary:
    path = Path(path)
    try:
        g = zarr.open_group(path, mode="r")
        attrs = dict(g.attrs)
        arrays = [np.asarray(g[name][:]) for name in ("centroids", "weights", "sse")]
    except Exception as err:  # zarr raises several types for a missing/corrupt store
        raise HistopipeError(f"{path}: not a readable batch summary (zarr group with centroids, weights, sse): {err}") from None
    missing = [k for k in ("slides", "exact", "dim", *SUMMARY_SETTINGS) if k not in attrs]
    if missing:
        raise HistopipeError(f"{path}: batch summary lacks attrs {missing} (write it with histopipe summarize-samples)")
    return Summary(np.ascontiguousarray(arrays[0], dtype=np.float32), arrays[1].astype(np.float64),
                   arrays[2].astype(np.float64), attrs)


def _check_summary(path: Path, summary: Summary, shared: dict, ref: SampleInfo, cfg: ClusterConfig) -> None:
    a = summary.attrs
    if a["dim"] != shared["dim"] or a.get("encoder") != shared["encoder"]:
        raise HistopipeError(
            f"{path}: summary of encoder {a.get('encoder')!r} dim {a['dim']} (slides {a['slides'][:3]}) differs from "
            f"{ref.store.path}: encoder {shared['encoder']!r} dim {shared['dim']}; one model needs one encoder")
    have = {k: a[k] for k in SUMMARY_SETTINGS}
    want = {k: getattr(cfg, k) for k in SUMMARY_SETTINGS}
    if have != want:
        raise HistopipeError(f"{path}: summarised with {have}, but the fit's clustering config has {want}; "
                             "re-run summarize-samples with the same clustering settings")


def stream_stats(samples: Sequence[SampleInfo], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over every sampled tile: per-cluster sums of members float64 (k, D), member
    counts (k,) and summed squared distances to the centroid (k,)."""
    k, dim = centroids.shape
    index = faiss.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sums = np.zeros((k, dim))
    counts = np.zeros(k)
    sse = np.zeros(k)
    for block in iter_sample_blocks(samples):
        d2, idx = index.search(block, 1)
        labels = idx[:, 0]
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        sums[sorted_labels[starts]] += np.add.reduceat(block[order], starts, axis=0)
        counts += np.bincount(labels, minlength=k)
        sse += np.bincount(labels, weights=d2[:, 0].astype(np.float64), minlength=k)
    return sums, counts, sse


def refine(
    samples: Sequence[SampleInfo], centroids: np.ndarray, passes: int, spherical: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """``passes`` Lloyd steps over every sampled tile, streamed, then one pass for the
    statistics of the final centroids. Returns centroids float32 (k, D), counts (k,),
    variances (k,) and the mean squared distance of a tile to its centroid before each
    step and after the last (passes + 1 values). An empty cluster keeps its centroid."""
    objective = []
    for step in range(passes + 1):
        sums, counts, sse = stream_stats(samples, centroids)
        objective.append(float(sse.sum() / max(counts.sum(), 1)))
        log.info("pass %d over %d sampled tiles: mean squared distance %.6f", step, int(counts.sum()), objective[-1])
        if step == passes:
            break
        new = sums / np.maximum(counts, 1)[:, None]
        if spherical:
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        centroids = np.ascontiguousarray(np.where((counts > 0)[:, None], new, centroids), dtype=np.float32)
    return centroids, counts, np.where(counts > 0, sse / np.maximum(counts, 1), 0.0), objective


def fit_two_level(sample_paths: Sequence[str | Path], summary_paths: Sequence[str | Path], cfg: ClusterConfig) -> ClusterModel:
    """The cohort step of the two-level fit (module docstring): global k-means with re-split
    on the batch summaries, refinement passes over every sampled tile, Ward levels."""
    samples = open_samples(sample_paths, cfg.per_slide_cap, cfg.seed, cfg.normalize)
    infos = [s.store for s in samples]
    shared = check_compatible(infos)
    known = {i.slide_id for i in infos}
    covered: set[str] = set()
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    empty_batches, reductions, exact = [], 0, True
    for path in sorted(Path(p) for p in summary_paths):
        summary = read_summary(path)
        _check_summary(path, summary, shared, samples[0], cfg)
        slides = set(summary.attrs["slides"])
        if slides & covered or slides - known:
            raise HistopipeError(f"{path}: summarises slides {sorted(slides & covered or slides - known)[:5]} that are "
                                 "in another summary or have no sample store in this fit")
        covered |= slides
        if not len(summary.centroids):
            log.warning("%s: no sampled tiles in this batch (slides %s); it contributes nothing", path, sorted(slides)[:5])
            empty_batches.append({"summary": str(path), "slides": sorted(slides)})
            continue
        exact &= bool(summary.attrs["exact"])
        held.append((summary.centroids, summary.weights, summary.sse))
        if sum(len(h[0]) for h in held) > cfg.total_cap:
            x, w, e = (np.concatenate(parts) for parts in zip(*held, strict=True))
            held = [reduce_rows(x, w, e, max(cfg.k, cfg.total_cap // 2), cfg)]
            reductions, exact = reductions + 1, False
    if known - covered:
        raise HistopipeError(f"slides {sorted(known - covered)[:5]} have sample stores but no batch summary; "
                             "re-run summarize-samples for their batches")
    if not held:
        raise HistopipeError(f"no sampled tiles in any of the {len(summary_paths)} batch summaries")
    x, w, e = (np.concatenate(parts) for parts in zip(*held, strict=True))
    log.info("global k-means: %d sub-centroids (%s) standing for %d tiles of %d slides, D=%d, k=%d", len(x),
             "the tiles themselves" if exact else f"{len(summary_paths)} batches", int(w.sum()), len(infos), x.shape[1], cfg.k)
    objective: list[float] = []
    if exact:
        centroids, events, var_before = fit_points(x, cfg)
        _, counts, var = cluster_stats(x, centroids)
    else:
        centroids, events, var_before = fit_points(x, cfg, w, e)
        centroids, counts, var, objective = refine(samples, centroids, cfg.refine_passes, cfg.spherical)
    counts = np.rint(counts).astype(np.int64)
    luts = ward_level_luts(centroids, counts, cfg.levels)
    meta = {
        "format": MODEL_FORMAT, **shared, "k": cfg.k, "levels": list(cfg.levels), "seed": cfg.seed, "niter": cfg.niter,
        "normalize": cfg.normalize, "spherical": cfg.spherical, "resplit_factor": cfg.resplit_factor,
        "per_slide_cap": cfg.per_slide_cap, "total_cap": cfg.total_cap, "method": "two_level",
        "n_sampled": int(sum(s.m for s in samples)), "n_slides": len(infos),
        "n_tiles_total": int(sum(i.n for i in infos)),
        "sampled_per_slide": {s.store.slide_id: s.m for s in samples},
        "n_batches": len(summary_paths), "n_subcentroids": int(len(x)), "summary_reductions": reductions,
        "exact": bool(exact), "empty_batches": empty_batches, "refine_objective": objective,
        "cluster_counts": counts.tolist(), "cluster_variance": [round(float(v), 6) for v in var],
        "max_variance_before_resplit": float(var_before.max()), "resplit": events, "config": config_record(cfg),
    }
    return ClusterModel(centroids, luts, meta)
