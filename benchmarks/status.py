"""``histopipe status`` against ``snakemake --summary`` on a constructed N-slide results tree.

The per-slide outputs are real: those of the demo cohort run through the workflow (target
``merge_patches``, built and cached by ``benchmarks/cohort_memory.py``), or of an existing
results folder given with ``--source`` and its config files. An N-slide cohort is a sheet
of N rows whose slide files are symlinks to the demo slides, and a results tree where every
per-slide output (tile store, embedding store, per-batch diversity sample, map with its PNG
and GeoJSON, patch store) is a symlink to the source slide's, under the new slide id, with a
Snakemake benchmark file per tiling and embedding job. The tree is in a mid-run state:
the last 5 % of the slides are embedded but not sampled, mapped or cut into patches, 1 % of
the slides failed at tiling (a failed store with its reason, written by histopipe's own
``write_failed_store``), and the cohort-level models are not trained.

Both commands run in a child process; wall time includes the interpreter's start-up, CPU
time is the child's user + system time.

    python benchmarks/status.py --slides 1000 10000 --work /tmp/status_bench
    python benchmarks/status.py --slides 10000 --source results/quality \\
        --configs config/config.yaml config/demo.yaml config/presets/cpu.yaml config/quality.yaml
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cohort_memory import build_inputs, child_env, cpu_model  # noqa: E402
from histopipe import paths  # noqa: E402

DEFAULT_CONFIGS = (ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml")


def load_cohort(configs: list[Path], sheet: Path, results: Path):
    from histopipe.config import load_configs
    from histopipe.sheet import read_sheet
    from histopipe.workflow import Cohort

    cfg = load_configs(configs, {"sheet": str(sheet), "results": str(results)})
    return Cohort(read_sheet(sheet, check_files=False), cfg)


def source_cohort(source: Path, configs: list[Path], demo_sheet: Path):
    """The source results' cohort (the demo's sheet) and the sheet's entries."""
    from histopipe.sheet import read_sheet

    if not demo_sheet.is_file():
        from histopipe.demo import build_demo_cohort

        demo_sheet = build_demo_cohort(demo_sheet.parent)
    return load_cohort(configs, demo_sheet, source), read_sheet(demo_sheet)


def link(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    if not dst.is_symlink():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(Path(src).resolve())


def build_tree(n: int, work: Path, source: Path, configs: list[Path], demo_sheet: Path,
               late_fraction: float = 0.05) -> tuple[Path, Path]:
    """The N-slide sheet and results tree (see the module docstring); cached in ``work``."""
    from histopipe.tiling import TilingConfig, write_failed_store

    src, demo = source_cohort(source, configs, demo_sheet)
    sheet, results = work / "slides.tsv", work / "results"
    done = work / "tree.done"
    if done.is_file():
        return sheet, results
    shutil.rmtree(work, ignore_errors=True)
    (work / "slides").mkdir(parents=True)
    ids = [f"s{i:05d}" for i in range(n)]
    rows = ["slide_id\tpath"]
    for i, sid in enumerate(ids):
        e = demo[i % len(demo)]
        f = work / "slides" / f"{sid}{e.path.suffix}"
        f.symlink_to(e.path)
        rows.append(f"{sid}\t{f}")
    sheet.write_text("\n".join(rows) + "\n")
    cohort = load_cohort(configs, sheet, results)
    r, t, enc, d = str(results), cohort.tiling_id, cohort.encoder, cohort.dataset_id
    origin = {sid: demo[i % len(demo)].slide_id for i, sid in enumerate(ids)}
    failed = set(ids[:: 100])
    late = set(ids[int(round(n * (1 - late_fraction))):])
    tiling = TilingConfig(**cohort.config["tiling"])
    bench = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n{s}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t0\n"
    for sid in ids:
        o = origin[sid]
        tiles = paths.TILES.format(results=r, tiling=t, slide=sid)
        if sid in failed:
            write_failed_store(tiles, sid, work / "slides" / sid, tiling, f"{sid}: unsupported or corrupt slide file")
        else:
            link(paths.TILES.format(results=str(source), tiling=t, slide=o), tiles)
            link(paths.TILE_QC.format(results=str(source), tiling=t, slide=o) + f"/{o}.tissue.png",
                 paths.TILE_QC.format(results=r, tiling=t, slide=sid) + f"/{sid}.tissue.png")
        link(paths.EMBEDDINGS.format(results=str(source), encoder=enc, tiling=t, slide=o),
             paths.EMBEDDINGS.format(results=r, encoder=enc, tiling=t, slide=sid))
        for rule, name, s in (("tile_slide", f"{t}/{sid}", 4.2), ("embed_tiles", f"{enc}/{t}/{sid}", 31.0)):
            b = Path(paths.BENCHMARK.format(results=r, rule=rule, name=name))
            b.parent.mkdir(parents=True, exist_ok=True)
            b.write_text(bench.format(s=s))
    src_batch = {o: src.batch_of[o] for o in src.slide_ids}
    for batch, members in cohort.batches.items():
        if any(s in late for s in members):
            continue
        for sid in members:
            o, ob = origin[sid], src_batch[origin[sid]]
            link(f"{src.cluster_sample_batches()[int(ob)]}/{o}.zarr", f"{cohort.cluster_sample_batches()[int(batch)]}/{sid}.zarr")
            for suffix in (".zarr", paths.MAP_PNG_SUFFIX, paths.MAP_GEOJSON_SUFFIX):
                link(f"{src.map_batch(ob)}/{o}{suffix}", f"{cohort.map_batch(batch)}/{sid}{suffix}")
            link(paths.SLIDE_PATCHES.format(results=str(source), dataset=d, batch=ob, slide=o),
                 paths.SLIDE_PATCHES.format(results=r, dataset=d, batch=batch, slide=sid))
    link(src.fitted_cluster_model(), cohort.fitted_cluster_model())
    if Path(src.montage()).is_file():
        link(src.montage(), cohort.montage())
    done.write_text(f"{n}\n")
    return sheet, results


def timed(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, str, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired:
        out, rc = f"timed out after {timeout:.0f} s", -1
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, out, rc


def add_source_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that say where the per-slide outputs copied into a constructed tree come from."""
    ap.add_argument("--source", type=Path, default=None, help="results folder with the demo cohort's per-slide outputs")
    ap.add_argument("--demo-sheet", type=Path, default=ROOT / "resources" / "demo" / "slides.tsv",
                    help="the demo cohort's sheet (written there by histopipe demo-cohort when missing)")
    ap.add_argument("--configs", type=Path, nargs="+", default=list(DEFAULT_CONFIGS), help="config files of --source")
    ap.add_argument("--cores", type=int, default=2)


def tree_source(args: argparse.Namespace, env: dict) -> tuple[Path, list[Path]]:
    """The results folder to copy from (the demo cohort run under --work when --source is not
    given; --demo-sheet then points at its sheet) and the resolved config files."""
    source = args.source
    if source is None:
        build_inputs(args.work / "inputs", args.cores, env)
        source = args.work / "inputs" / "demo" / "results"
        args.demo_sheet = args.work / "inputs" / "demo" / "cohort" / "slides.tsv"
    return source, [c.resolve() for c in args.configs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/status_bench"))
    add_source_arguments(ap)
    ap.add_argument("--summary-timeout", type=float, default=1800, help="seconds before snakemake --summary is given up")
    ap.add_argument("--no-summary", action="store_true", help="time histopipe status only")
    args = ap.parse_args()
    env = child_env(1)
    source, configs = tree_source(args, env)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"{'slides':>7} {'command':<20} {'wall s':>8} {'CPU s':>7}  result")
    for n in args.slides:
        sheet, results = build_tree(n, args.work / f"n{n}", source, configs, args.demo_sheet)
        status = [sys.executable, "-m", "histopipe", "status", "--config", *map(str, configs),
                  "--sheet", str(sheet), "--results", str(results)]
        wall, cpu, out, rc = timed(status, env, 1800)
        if rc != 0:
            raise SystemExit(out[-3000:])
        tile = next(x for x in out.splitlines() if x.startswith("tile "))
        print(f"{n:>7} {'histopipe status':<20} {wall:>8.1f} {cpu:>7.1f}  {' '.join(tile.split())}", flush=True)
        if args.no_summary:
            continue
        summary = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(sheet.parent),
                   "--profile", str(ROOT / "profiles" / "local"), "--summary", "--configfile", *map(str, configs),
                   "--config", f"sheet={sheet}", f"results={results}"]
        wall, cpu, out, rc = timed(summary, env, args.summary_timeout)
        lines = len(out.splitlines())
        result = f"{lines} lines" if rc == 0 else f"exit {rc}: {out.strip().splitlines()[-1][:80] if out.strip() else ''}"
        print(f"{n:>7} {'snakemake --summary':<20} {wall:>8.1f} {cpu:>7.1f}  {result}", flush=True)


if __name__ == "__main__":
    main()
