"""DAG construction at cohort scale: `snakemake -n` time and peak memory for N slides.

Builds an N-slide cohort sheet whose rows point (through symlinks) at the demo slides,
then times a dry run of the full workflow (`snakemake -n --quiet rules`: the DAG is built
in full, only the per-job printout is left out) with the SLURM profile's grouping, and
reports the number of SLURM jobs that grouping yields.

    python benchmarks/dag.py --slides 10000
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_sheet(n: int, workdir: Path) -> Path:
    from histopipe.demo import build_demo_cohort
    from histopipe.sheet import read_sheet

    demo = read_sheet(build_demo_cohort(workdir / "demo"))
    slides = workdir / "slides"
    slides.mkdir(exist_ok=True)
    lines = ["slide_id\tpath"]
    for i in range(n):
        src = demo[i % len(demo)].path
        link = slides / f"slide{i:05d}{src.suffix}"
        if not link.exists():
            link.symlink_to(src)
        lines.append(f"slide{i:05d}\tslides/{link.name}")
    sheet = workdir / "slides.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def dry_run(workdir: Path, sheet: Path, profile: str) -> tuple[float, float, float, str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(ROOT / "config/config.yaml"), "--profile", str(ROOT / profile), "-n", "--quiet", "rules",
           "--config", f"sheet={sheet}", f"results={workdir / 'results'}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # ru_maxrss of children is the largest child so far: the runs grow, so it is this one's.
    return seconds, cpu, after.ru_maxrss / 1024**2, proc.stdout + proc.stderr


def job_counts(output: str) -> dict[str, int]:
    counts = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if parts and parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


def _as_mapping(value) -> dict:
    """Profile entries may be a mapping or a list of ``key=value`` strings."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(item.split("=", 1) for item in value)


def slurm_jobs(counts: dict[str, int], profile: Path) -> int:
    """SLURM submissions under the profile's grouping (a group of G components = 1 job)."""
    import yaml

    prof = yaml.safe_load(profile.read_text())
    groups = _as_mapping(prof.get("groups"))
    components = {k: int(v) for k, v in _as_mapping(prof.get("group-components")).items()}
    total = 0
    grouped: dict[str, int] = {}
    for rule, n in counts.items():
        if rule == "all":
            continue
        g = groups.get(rule)
        if g is None:
            total += n
        else:
            grouped[g] = max(grouped.get(g, 0), n)
    for g, n in grouped.items():
        size = components.get(g, 1)
        total += -(-n // size)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--profile", default="profiles/slurm")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'slides':>8} {'dry-run s':>10} {'CPU s':>7} {'peak GiB':>9} {'rule jobs':>10} {'SLURM jobs':>11}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.slides:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            sheet = build_sheet(n, work)
            seconds, cpu, peak_gib, out = dry_run(work, sheet, args.profile)
            counts = job_counts(out)
            n_jobs = sum(v for k, v in counts.items() if k != "all")
            slurm = slurm_jobs(counts, ROOT / args.profile / "config.yaml")
            print(f"{n:>8} {seconds:>10.1f} {cpu:>7.1f} {peak_gib:>9.2f} {n_jobs:>10} {slurm:>11}", flush=True)

if __name__ == "__main__":
    main()
