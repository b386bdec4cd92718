"""Time and peak memory of the two-level cohort fit at the paper's scale (or a fraction of it).

The paper's cohort is 11 765 slides × 1 000 diversity-sampled tiles × D = 1024. Sample
stores are written synthetically (Gaussian blobs, L2-normalised, float16 on disk, in the
layout ``sample-embeddings`` writes; the fit's cost does not depend on how the rows were
chosen). Then, as the workflow runs them, each in its own child process:

- one ``histopipe summarize-samples`` job per batch of ``--batch-slides`` slides, timed apart
  (wall, CPU and peak RSS of each);
- the cohort job ``histopipe fit-clusters --samples-list --summaries-list`` for each cohort
  size in ``--slides`` (the first N slides), so that its peak memory can be compared across
  sizes.

``--kmeans-rows`` also times plain faiss k-means (k = ``--k``, 20 iterations) on that many
random rows of dimension ``--dim``, in this process.

    python benchmarks/cohort_fit.py --slides 11765 --tiles 1000 --dim 1024 --work /data/cohort_fit
    python benchmarks/cohort_fit.py --slides 100 400 --tiles 1000 --dim 1024 --kmeans-rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI in this child process and reports its CPU seconds and peak resident memory.
CHILD = ("import resource, sys; from histopipe.cli import main; rc = main(sys.argv[1:]); "
         "u = resource.getrusage(resource.RUSAGE_SELF); "
         "print('usage', u.ru_utime + u.ru_stime, u.ru_maxrss, file=sys.stderr); sys.exit(rc)")
CHUNK_ROWS = 256  # as histopipe.slide_samples writes them


def run_child(argv: list[str], threads: int, log: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of ``histopipe ARGV`` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"histopipe {argv[0]} failed; see {log}:\n{r.stderr[-2000:]}")
    cpu, kib = next(line.split()[1:] for line in r.stderr.splitlines() if line.startswith("usage "))
    return wall, float(cpu), int(kib) / 1024


def write_samples(root: Path, n_slides: int, tiles: int, dim: int, settings: dict) -> list[Path]:
    """Synthetic sample stores s00000.zarr …, float16; existing ones are kept."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, dim)).astype(np.float32)
    paths = []
    for s in range(n_slides):
        path = root / f"s{s:05d}.zarr"
        paths.append(path)
        if (path / "zarr.json").exists():
            continue
        r = np.random.default_rng(s + 1)
        x = centres[r.integers(300, size=tiles)] + 0.7 * r.standard_normal((tiles, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        tmp = path.with_name(path.name + ".tmp")
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        g.create_array("features", data=x.astype(np.float16), chunks=(CHUNK_ROWS, dim))
        g.create_array("rows", data=np.arange(tiles, dtype=np.int64), chunks=(tiles,))
        g.attrs.update({"slide_id": f"s{s:05d}", "n_tiles": tiles * 20, "dim": dim, "encoder": "bench",
                        "weights_sha256": None, "tiling": "bench", "order": "priority", **settings})
        tmp.rename(path)
    return paths


def du_gib(paths: list[Path]) -> float:
    return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, nargs="+", default=[11765], help="cohort sizes to fit (first N slides)")
    ap.add_argument("--tiles", type=int, default=1000, help="sampled tiles per slide (per_slide_cap)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch-slides", type=int, default=50, help="slides per summary job (slides_per_batch)")
    ap.add_argument("--batch-centroids", type=int, default=256)
    ap.add_argument("--refine-passes", type=int, default=2)
    ap.add_argument("--total-cap", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kmeans-rows", type=int, default=0, help="also time faiss k-means on this many rows (0: skip)")
    ap.add_argument("--work", type=Path, default=None, help="keep the sample stores here for later runs (default: a temp dir)")
    args = ap.parse_args()
    n_max = max(args.slides)
    if any(n % args.batch_slides for n in args.slides if n != n_max):
        raise SystemExit(f"--slides: every size but the largest must be a multiple of --batch-slides {args.batch_slides}")
    settings = {"per_slide_cap": args.tiles, "seed": 0, "normalize": "l2"}
    config = json.dumps({"clustering": {**settings, "k": args.k, "levels": [args.k, *(v for v in (50, 20, 10, 5) if v < args.k)],
                                        "batch_centroids": args.batch_centroids, "refine_passes": args.refine_passes,
                                        "total_cap": args.total_cap}})
    work = args.work or Path(tempfile.mkdtemp(prefix="cohort_fit_"))
    (work / "samples").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    t = time.perf_counter()
    samples = write_samples(work / "samples", n_max, args.tiles, args.dim, settings)
    write_s = time.perf_counter() - t

    batches = [samples[b : b + args.batch_slides] for b in range(0, n_max, args.batch_slides)]
    jobs = []
    for i, members in enumerate(batches):
        lst = work / f"batch-{i:05d}.txt"
        lst.write_text("".join(f"{p}\n" for p in members))
        out = work / "summaries" / f"batch-{i:05d}.zarr"
        if out.exists():
            shutil.rmtree(out)
        jobs.append(run_child(["summarize-samples", "--samples-list", str(lst), "--out", str(out), "--config-json", config],
                              args.threads, work / "logs" / f"summarize-{i:05d}.log"))

    fits = []
    for n in sorted(args.slides):
        n_batches = -(-n // args.batch_slides)
        lst = work / f"samples-{n}.txt"
        lst.write_text("".join(f"{p}\n" for p in samples[:n]))
        sums = work / f"summaries-{n}.txt"
        sums.write_text("".join(f"{work / 'summaries' / f'batch-{i:05d}.zarr'}\n" for i in range(n_batches)))
        out = work / f"model-{n}"
        if out.exists():
            shutil.rmtree(out)
        fits.append((n, *run_child(["fit-clusters", "--samples-list", str(lst), "--summaries-list", str(sums),
                                    "--out", str(out), "--config-json", config], args.threads, work / "logs" / f"fit-{n}.log")))

    km = None
    if args.kmeans_rows:
        faiss.omp_set_num_threads(args.threads)
        x = np.random.default_rng(0).standard_normal((args.kmeans_rows, args.dim), dtype=np.float32)
        kmeans = faiss.Kmeans(args.dim, args.k, niter=20, seed=0, verbose=False,
                              max_points_per_centroid=args.kmeans_rows // args.k + 1)
        t, cpu = time.perf_counter(), time.process_time()
        kmeans.train(x)
        km = (time.perf_counter() - t, time.process_time() - cpu)

    walls = [j[0] for j in jobs]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, faiss threads {args.threads}; "
          f"{n_max} slides × {args.tiles} tiles × D={args.dim} (float16 sample stores, {du_gib(samples):.2f} GiB, "
          f"written in {write_s:.0f} s); batches of {args.batch_slides} slides → {args.batch_centroids} sub-centroids; "
          f"k={args.k}, {args.refine_passes} refinement passes; work dir {work}")
    print("| step | wall s | CPU s | peak MiB |")
    print("|---|---:|---:|---:|")
    print(f"| summarize-samples, one batch of {args.batch_slides} slides (median of {len(jobs)}) | "
          f"{statistics.median(walls):.1f} | {statistics.median(j[1] for j in jobs):.1f} | {max(j[2] for j in jobs):.0f} |")
    print(f"| summarize-samples, all {len(jobs)} batches one after another | {sum(walls):.1f} | {sum(j[1] for j in jobs):.1f} | |")
    for n, wall, cpu, mib in fits:
        print(f"| fit-clusters --summaries, {n} slides ({n * args.tiles} tiles) | {wall:.1f} | {cpu:.1f} | {mib:.0f} |")
    if km:
        print(f"| faiss k-means {args.kmeans_rows} × {args.dim}, k={args.k}, 20 iterations (in-process) | {km[0]:.1f} | {km[1]:.1f} | |")
    for n, *_ in fits:
        meta = json.loads((work / f"model-{n}" / "model.json").read_text())
        print(f"model {n} slides: {meta['n_subcentroids']} sub-centroids, {meta['summary_reductions']} reductions, "
              f"objective per pass {[round(v, 5) for v in meta['refine_objective']]}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
