"""Quality of the capped and the two-level cohort fit on a constructed cohort with known types.

Every slide's diversity sample is drawn from Gaussian blobs of very different sizes and
spreads: a few common broad types in most slides, medium types in some, and rare tight
types each present in 1 % of the slides only. The samples are written as sample stores (in
priority order, as ``sample-embeddings`` writes them), then fitted twice with the same
settings:

- capped: ``fit_samples``, each slide's prefix of its quota, at most ``total_cap`` tiles;
- two-level: ``summarize_batch`` per batch of ``--batch-slides`` slides, then
  ``fit_two_level`` (total_cap bounds the sub-centroids held, not the tiles that count).

Printed per fit and seed: adjusted Rand index against the true types (finest level, and the
Ward level with as many types as the truth), rare types found (a type is found when one
centroid's members, over all sampled tiles, are ≥ 80 % that type) and the k-means
objective (mean squared distance of every sampled tile to its nearest centroid, on the
L2-normalised features the fits use), with the fit's wall time.

    python benchmarks/cluster_quality.py --slides 1000 --tiles 300 --total-cap 6000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
from sklearn.metrics import adjusted_rand_score

from histopipe.clustering import ClusterConfig, ClusterModel, fit_samples, nearest
from histopipe.sampling import SlideSample, StoreInfo, normalize_rows, priority_order
from histopipe.slide_samples import write_sample
from histopipe.summaries import fit_two_level, summarize_batch, write_summary

COMMON, MEDIUM, RARE = 4, 10, 6  # types of each kind
FOUND = 0.8  # purity at which a centroid finds a type


def make_types(dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (T, D), spreads (T,) and kinds (T,: 0 common, 1 medium, 2 rare)."""
    n = COMMON + MEDIUM + RARE
    centres = rng.standard_normal((n, dim)) / np.sqrt(dim)
    kinds = np.repeat([0, 1, 2], [COMMON, MEDIUM, RARE])
    spread = np.where(kinds == 0, 0.45, np.where(kinds == 1, 0.25, 0.12)) * rng.uniform(0.7, 1.3, n)
    return centres.astype(np.float32), spread.astype(np.float32), kinds


def slide_tiles(s: int, m: int, centres, spread, kinds, rng) -> tuple[np.ndarray, np.ndarray]:
    """One slide's m sampled tiles (float32 (m, D)) and their true types."""
    dim = centres.shape[1]
    weights = np.zeros(len(centres))
    weights[kinds == 0] = rng.uniform(2, 6, COMMON)
    medium = np.flatnonzero(kinds == 1)
    present = medium[rng.random(len(medium)) < 0.3]
    weights[present] = rng.uniform(0.5, 2, len(present))
    # Rare type j lives in its own 1 % of the slides: those with s % 100 == 7 j.
    for j, r in enumerate(np.flatnonzero(kinds == 2)):
        if s % 100 == 7 * j:
            weights[r] = 1.0
    which = rng.choice(len(centres), m, p=weights / weights.sum())
    x = centres[which] + spread[which, None] * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
    return x.astype(np.float32), which


def write_cohort(root: Path, n_slides: int, m: int, dim: int, cfg: ClusterConfig, seed: int):
    rng = np.random.default_rng(seed)
    centres, spread, kinds = make_types(dim, rng)
    paths, feats, truth = [], [], []
    for s in range(n_slides):
        x, which = slide_tiles(s, m, centres, spread, kinds, rng)
        x = normalize_rows(x, cfg.normalize)
        order = priority_order(x)
        info = StoreInfo(root / f"s{s:05d}.emb.zarr", f"s{s:05d}", m, dim, {"encoder": "blobs", "tiling": "t"})
        paths.append(root / f"s{s:05d}.zarr")
        write_sample(paths[-1], SlideSample(order.astype(np.int64), x[order], info), cfg.per_slide_cap, cfg.seed, cfg.normalize)
        feats.append(x)
        truth.append(which)
    return paths, np.concatenate(feats), np.concatenate(truth), kinds


def score(model: ClusterModel, x: np.ndarray, truth: np.ndarray, kinds: np.ndarray) -> dict:
    labels, d2 = nearest(x, model.centroids)
    n_types = len(kinds)
    level = model.levels.index(n_types) if n_types in model.levels else None
    found = []
    for t in np.flatnonzero(kinds == 2):
        hit = False
        for c in np.unique(labels[truth == t]):
            members = truth[labels == c]
            hit |= bool(np.mean(members == t) >= FOUND)
        found.append(hit)
    return {
        "ari": adjusted_rand_score(truth, labels),
        "ari_level": adjusted_rand_score(truth, model.level_luts[level][labels]) if level is not None else float("nan"),
        "rare": f"{sum(found)}/{len(found)}",
        "objective": float(d2.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=300, help="sampled tiles per slide (its diversity sample)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--total-cap", type=int, default=6000)
    ap.add_argument("--batch-slides", type=int, default=50, help="slides per batch summary (slides_per_batch)")
    ap.add_argument("--batch-centroids", type=int, default=256)
    ap.add_argument("--refine-passes", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    n_types = COMMON + MEDIUM + RARE
    levels = tuple(sorted({args.k, n_types, 5}, reverse=True))
    rows = []
    for seed in args.seeds:
        cfg = ClusterConfig(k=args.k, levels=levels, seed=seed, per_slide_cap=args.tiles, total_cap=args.total_cap,
                            batch_centroids=args.batch_centroids, refine_passes=args.refine_passes)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths, x, truth, kinds = write_cohort(root, args.slides, args.tiles, args.dim, cfg, seed)
            t = time.perf_counter()
            capped = fit_samples(paths, replace(cfg, method="capped"))
            rows.append(("capped", seed, time.perf_counter() - t, score(capped, x, truth, kinds)))
            t = time.perf_counter()
            summaries = []
            for b in range(0, len(paths), args.batch_slides):
                summaries.append(root / f"batch-{b // args.batch_slides:05d}.zarr")
                write_summary(summaries[-1], summarize_batch(paths[b : b + args.batch_slides], cfg))
            two = fit_two_level(paths, summaries, cfg)
            rows.append(("two-level", seed, time.perf_counter() - t, score(two, x, truth, kinds)))
    print(f"{args.slides} slides × {args.tiles} sampled tiles, D={args.dim}, {n_types} true types "
          f"({COMMON} common, {MEDIUM} medium, {RARE} rare in 1 % of slides), k={args.k}, total_cap={args.total_cap}, "
          f"batches of {args.batch_slides} slides × {args.batch_centroids} sub-centroids, {args.refine_passes} passes")
    print(f"| fit | seed | ARI (k={args.k}) | ARI (Ward level {n_types}) | rare types found | objective | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seed, sec, s in rows:
        print(f"| {name} | {seed} | {s['ari']:.3f} | {s['ari_level']:.3f} | {s['rare']} | {s['objective']:.5f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
