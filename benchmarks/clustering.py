"""Cost of fitting and assigning tissue types at foundation-model scale (synthetic features).

Prints one table: per-slide diversity sampling (read + project + k-means + nearest tiles +
farthest-point priority order: one ``sample-embeddings`` job without its start-up), the
cohort k-means with re-split and Ward levels, and per-slide assignment, for the sizes given.
Features are Gaussian blobs stored as float16, like a real embedding store. Wall and CPU
seconds (CPU of all threads: steadier than wall time on a shared machine).

    python benchmarks/clustering.py --dim 1536 --tiles 20000 100000 --fit-rows 50000 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import zarr

from histopipe.clustering import ClusterModel, kmeans, resplit, ward_level_luts
from histopipe.sampling import normalize_rows, sample_slide


def write_store(path: Path, n: int, dim: int, rng: np.random.Generator) -> Path:
    centers = rng.standard_normal((200, dim)).astype(np.float32)
    g = zarr.open_group(path, mode="w")
    feats = g.create_array("features", shape=(n, dim), dtype="float16", chunks=(4096, dim))
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        feats[start : start + m] = (centers[rng.integers(200, size=m)] + 0.5 * rng.standard_normal((m, dim))).astype(np.float16)
    g.create_array("coords", data=np.zeros((n, 2), np.int64))
    g.attrs.update({"encoder": "bench", "dim": dim, "slide_id": path.stem, "n_tiles": n})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--tiles", type=int, nargs="+", default=[20000, 100000], help="tiles per slide to time sampling/assignment on")
    ap.add_argument("--cap", type=int, default=1000, help="per-slide cap")
    ap.add_argument("--fit-rows", type=int, default=50000, help="sampled rows for the cohort k-means")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        rows.append((name, time.perf_counter() - wall, time.process_time() - cpu))

    with tempfile.TemporaryDirectory() as tmp:
        stores = {n: write_store(Path(tmp) / f"s{n}.zarr", n, args.dim, rng) for n in args.tiles}
        for n, path in stores.items():
            with timed(f"sample {args.cap} of {n} tiles, priority order (one slide)"):
                sample_slide(path, args.cap, seed=0)
        x = normalize_rows(rng.standard_normal((args.fit_rows, args.dim)).astype(np.float32), "l2")
        with timed(f"k-means k={args.k} on {args.fit_rows} rows, {args.niter} iter"):
            c = kmeans(x, args.k, 0, args.niter, True)
        with timed("re-split check (+ splits if any)"):
            c, _ = resplit(x, c, 3.0, 0, args.niter, True)
        with timed("Ward levels"):
            luts = ward_level_luts(c, np.ones(args.k), [args.k, 50, 20, 10, 5][: 1 + sum(v < args.k for v in (50, 20, 10, 5))])
        model = ClusterModel(c, luts, {"format": 1, "levels": [int(v) for v in luts.max(1) + 1], "normalize": "l2", "encoder": "bench"})
        for n, path in stores.items():
            with timed(f"assign {n} tiles (one slide)"):
                model.assign_store(path)
    print(f"machine: {platform.processor() or platform.machine()}, faiss threads {args.threads}, dim {args.dim}")
    print(f"{'step':<55} {'wall s':>8} {'CPU s':>8}")
    for name, sec, cpu in rows:
        print(f"{name:<55} {sec:8.2f} {cpu:8.2f}")

if __name__ == "__main__":
    main()
