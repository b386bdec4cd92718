"""Size and time of ``snakemake --report`` as the cohort grows, and the number of slide images in it.

On a constructed N-slide results tree (``benchmarks/status.py``: the demo cohort's real
per-slide outputs, tile stores with their tissue overlays, maps with their PNGs, symlinked
under new slide ids, 1 % of the slides failed at tiling), the ``tabulate_slides`` job runs as
the workflow runs it (``histopipe slide-table --list FILE``), then ``snakemake --report``
writes the report of the per-slide part of the workflow (target: the slide table) as HTML
and as a zip archive. Model, synthesis and evaluation figures are a fixed number per run,
whatever the cohort size, and are left out (the tree has no trained models).

Both commands run in a child process; CPU time is the child's user + system time.

    python benchmarks/report.py --slides 100 1000 --source results/quality \\
        --configs config/config.yaml config/demo.yaml config/presets/cpu.yaml config/quality.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cohort_memory import child_env, cpu_model  # noqa: E402
from benchmarks.status import add_source_arguments, build_tree, load_cohort, timed, tree_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/report_bench"))
    add_source_arguments(ap)
    args = ap.parse_args()
    env = child_env(1)
    source, configs = tree_source(args, env)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"{'slides':>7} {'slide-table s':>14} {'CPU s':>6} {'--report s':>11} {'CPU s':>6} {'HTML MB':>8} "
          f"{'zip MB':>7} {'images':>7} {'table rows':>11}")
    for n in args.slides:
        sheet, results = build_tree(n, args.work / f"n{n}", source, configs, args.demo_sheet, late_fraction=0.0)
        cohort = load_cohort(configs, sheet, results)
        listing = args.work / f"n{n}" / "slides.list"
        listing.write_text("".join(f"{t}\t{m}\t{q}\n" for t, m, q in
                                   zip(cohort.tile_stores(), cohort.map_stores(), cohort.tile_qc_dirs(), strict=True)))
        rep = cohort.config["report"]
        table = [sys.executable, "-m", "histopipe", "slide-table", "--list", str(listing),
                 "--tsv", cohort.slide_table("tsv"), "--html", cohort.slide_table("html"), "--images", cohort.report_slides(),
                 "--max-slides", str(rep["max_slides"]), "--image-px", str(rep["image_px"])]
        t_wall, t_cpu, out, rc = timed(table, env, 3600)
        if rc != 0:
            raise SystemExit(out[-3000:])
        sizes = {}
        r_wall = r_cpu = 0.0
        for ext in ("html", "zip"):
            report = args.work / f"n{n}" / f"report.{ext}"
            cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(sheet.parent),
                   "--profile", str(ROOT / "profiles" / "local"), "--report", str(report), "--configfile", *map(str, configs),
                   "--config", f"sheet={sheet}", f"results={results}", "--", cohort.slide_table("html")]
            wall, cpu, out, rc = timed(cmd, env, 3600)
            if rc != 0:
                raise SystemExit(out[-3000:])
            sizes[ext] = report.stat().st_size / 2**20
            if ext == "html":
                r_wall, r_cpu = wall, cpu
        with zipfile.ZipFile(args.work / f"n{n}" / "report.zip") as z:
            images = sum(name.endswith(".png") for name in z.namelist())
        rows = len(Path(cohort.slide_table("tsv")).read_text().splitlines()) - 1
        print(f"{n:>7} {t_wall:>14.1f} {t_cpu:>6.1f} {r_wall:>11.1f} {r_cpu:>6.1f} {sizes['html']:>8.1f} {sizes['zip']:>7.1f} "
              f"{images:>7} {rows:>11}", flush=True)


if __name__ == "__main__":
    main()
