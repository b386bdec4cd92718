"""Cost of the split fit: per-slide ``sample-embeddings`` jobs, then the cohort ``fit-clusters --samples``.

Synthetic features (Gaussian blobs, float16 stores like real ones). The per-slide step is
timed on ``--timed-slides`` real embedding stores (in-process, and once through the CLI for
its wall time and peak memory); the other slides' sample stores are written directly with
the same shape (m = min(tiles, cap) rows, float32, normalised), since the cohort step's cost
does not depend on how they were chosen. The cohort step runs as ``histopipe fit-clusters
--samples-list`` in a child process, whose peak RSS is reported.

    python benchmarks/sampling.py --slides 200 --tiles 2000 --dim 1536 --cap 1000 --total-cap 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clustering import write_store  # noqa: E402

from histopipe.sampling import SlideSample, StoreInfo, normalize_rows, sample_slide  # noqa: E402
from histopipe.slide_samples import cohort_from_samples, write_sample  # noqa: E402

# Runs the CLI in this child process and reports its CPU seconds and peak resident memory.
CHILD = ("import resource, sys; from histopipe.cli import main; rc = main(sys.argv[1:]); "
         "u = resource.getrusage(resource.RUSAGE_SELF); "
         "print('usage', u.ru_utime + u.ru_stime, u.ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run_child(*argv: object, threads: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of ``histopipe ARGV`` in a child process."""
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": ""}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    cpu, kib = next(line.split()[1:] for line in r.stderr.splitlines() if line.startswith("usage "))
    return wall, float(cpu), int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000, help="tiles per slide")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--cap", type=int, default=1000, help="clustering.per_slide_cap")
    ap.add_argument("--total-cap", type=int, default=100_000, help="clustering.total_cap")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--timed-slides", type=int, default=5, help="slides sampled for real to time the per-slide step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    levels = [v for v in (args.k, 50, 20, 10, 5) if v <= args.k]
    cfg = json.dumps({"clustering": {"k": args.k, "levels": levels, "niter": args.niter, "per_slide_cap": args.cap,
                                     "total_cap": args.total_cap}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = []
        per_slide = []
        for s in range(args.timed_slides):
            store = write_store(root / f"s{s:04d}.emb.zarr", args.tiles, args.dim, rng)
            samples.append(root / f"s{s:04d}.sample.zarr")
            t, c = time.perf_counter(), time.process_time()
            write_sample(samples[-1], sample_slide(store, args.cap, 0, "l2"), args.cap, 0, "l2")
            per_slide.append((time.perf_counter() - t, time.process_time() - c))
        wall, cpu = np.median(per_slide, axis=0)
        rows.append((f"per-slide sample {args.cap} of {args.tiles} tiles + write, in-process (median of {args.timed_slides})",
                     wall, cpu, None))
        rows.append(("per-slide job: histopipe sample-embeddings (CLI, incl. start-up)",
                     *run_child("sample-embeddings", root / "s0000.emb.zarr", "--out", root / "cli.sample.zarr",
                                "--config-json", cfg, threads=args.threads)))
        centers = rng.standard_normal((200, args.dim)).astype(np.float32)
        m = min(args.tiles, args.cap)
        for s in range(args.timed_slides, args.slides):
            x = centers[rng.integers(200, size=m)] + 0.5 * rng.standard_normal((m, args.dim), dtype=np.float32)
            info = StoreInfo(root / f"s{s:04d}.emb.zarr", f"s{s:04d}.emb", args.tiles, args.dim, {"encoder": "bench"})
            samples.append(root / f"s{s:04d}.sample.zarr")
            write_sample(samples[-1], SlideSample(np.arange(m, dtype=np.int64), normalize_rows(x, "l2"), info), args.cap, 0, "l2")
        (root / "samples.txt").write_text("".join(f"{p}\n" for p in samples))
        t, c = time.perf_counter(), time.process_time()
        cohort = cohort_from_samples(samples, args.cap, args.total_cap, 0, "l2")
        rows.append((f"cohort step: read every slide's prefix ({len(cohort.features)} rows), in-process",
                     time.perf_counter() - t, time.process_time() - c, None))
        del cohort
        usage = run_child("fit-clusters", "--samples-list", root / "samples.txt", "--out", root / "model",
                          "--config-json", cfg, threads=args.threads)
        n_fit = json.loads((root / "model" / "model.json").read_text())["n_sampled"]
        rows.append((f"cohort job: fit-clusters --samples, {args.slides} slides, {n_fit} rows, k={args.k}", *usage))
    print(f"machine: {platform.processor() or platform.machine()}, threads {args.threads}, dim {args.dim}, "
          f"cap {args.cap}, total cap {args.total_cap}")
    print(f"{'step':<84} {'wall s':>7} {'CPU s':>7} {'peak MiB':>8}")
    for name, sec, cpu, mib in rows:
        print(f"{name:<84} {sec:7.2f} {cpu:7.2f} {'' if mib is None else f'{mib:8.0f}'}")


if __name__ == "__main__":
    main()
