"""Peak memory and time of the cohort-level steps (``fit-clusters``, ``merge-patches``) as the cohort grows.

The per-slide inputs are real: the demo cohort (``histopipe demo-cohort``) is run through
the workflow itself (Snakemake, config/config.yaml + config/demo.yaml, target
``merge_patches``), which tiles, embeds (efficientnet_lite0), samples each slide
(``sample-embeddings``), fits the tissue types, maps every slide and extracts its patches
(``extract-patches``). These per-slide sample and patch stores are cached in ``--work``.
Larger cohorts are copies of them under new slide ids (``<slide>-x<copy>``: the
``slide_id`` attribute, and the patch stores' ``slide_id`` array, rewritten), which both
steps accept as distinct slides: ids are what they check for duplicates, order slides by,
assign quotas and train/val/test splits to.

Each step runs as the workflow runs it, ``python -m histopipe fit-clusters --samples-list
FILE --out MODEL --config-json '{"clustering": ...}'`` and ``python -m histopipe
merge-patches --list FILE --out patches.zarr --config-json '{"patches": ...}'``, in its own
child process; peak memory is that child's ``ru_maxrss`` from ``os.wait4`` (the most
resident memory it ever had), wall time includes the interpreter's start-up. The same
children that only import the step's modules give the fixed part of the peak.

    python benchmarks/cohort_memory.py --scales 1 10 40 --work /tmp/cohort_memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zarr

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml")
# What each step's module imports before it reads anything: the fixed part of its peak.
IMPORTS = {
    "fit": "import histopipe.cli, histopipe.clustering",
    "merge": "import histopipe.cli, histopipe.dataset",
}


def child_env(threads: int) -> dict[str, str]:
    """This checkout's package first on the path, this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def measure(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``argv`` in a child process: wall seconds and its peak RSS in MiB (``ru_maxrss``)."""
    with open(log, "w") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child (and any it waited for)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def cpu_model() -> str:
    """The CPU's model name (as lscpu prints it), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def demo_config() -> dict:
    """The workflow's config for the demo: config.yaml with demo.yaml laid over, defaults filled."""
    from histopipe.config import load_configs

    return load_configs(CONFIGS)


def build_inputs(work: Path, cores: int, env: dict[str, str]) -> tuple[list[Path], list[Path]]:
    """Per-slide sample stores and patch stores of the demo cohort, built once by the workflow."""
    demo = work / "demo"
    done = demo / "inputs.json"
    if not done.is_file():
        demo.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "histopipe", "demo-cohort", str(demo / "cohort")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(demo),
               "--profile", str(ROOT / "profiles" / "local"), "--cores", str(cores),
               "--configfile", *map(str, CONFIGS),
               "--config", f"sheet={demo / 'cohort' / 'slides.tsv'}", f"results={demo / 'results'}", "--", "merge_patches"]
        with open(demo / "snakemake.log", "w") as log:
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            raise SystemExit(f"the workflow failed on the demo cohort; see {demo / 'snakemake.log'}")
        samples = sorted((demo / "results" / "clusters").glob("*/*/samples/*.zarr"))
        patches = sorted((demo / "results" / "dataset").glob("*/slides/*.zarr"))
        done.write_text(json.dumps({"samples": [str(p) for p in samples], "patches": [str(p) for p in patches],
                                    "seconds": round(time.perf_counter() - t, 1)}, indent=1))
    listed = json.loads(done.read_text())
    return [Path(p) for p in listed["samples"]], [Path(p) for p in listed["patches"]]


def copy_store(src: Path, dst: Path, slide_id: str) -> None:
    """A copy of a per-slide store under another slide id (attribute, and the per-patch array if any)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    group = zarr.open_group(str(tmp), mode="r+")
    group.attrs["slide_id"] = slide_id
    if "slide_id" in group and group["slide_id"].shape[0]:
        group["slide_id"][:] = [slide_id] * group["slide_id"].shape[0]
    tmp.rename(dst)


def cohort(stores: list[Path], scale: int, folder: Path) -> list[Path]:
    """``scale`` copies of every store, each under its own slide id (cached in ``folder``)."""
    if scale == 1:
        return stores  # the workflow's own outputs
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for c in range(scale):
        for src in stores:
            slide_id = f"{zarr.open_group(str(src), mode='r').attrs['slide_id']}-x{c:03d}"
            dst = folder / f"{slide_id}.zarr"
            if not dst.is_dir():
                copy_store(src, dst, slide_id)
            out.append(dst)
    return out


def write_list(paths: list[Path], path: Path) -> Path:
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


def above(row: dict, one: dict, key: str, imports: float) -> str:
    """Ratio of the peaks above the imports' peak (the part that data can make grow)."""
    a, b = row[key] - imports, one[key] - imports
    return f"{a / b:.2f}" if b > 1 else f"{a:+.0f} vs {b:+.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 40], help="cohort sizes, in demo cohorts (first must be 1)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cached inputs and outputs (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads of the children (faiss)")
    args = ap.parse_args()
    if args.scales[0] != 1:
        ap.error("--scales must start with 1 (the ratios are to the demo cohort)")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cohort_memory_")
        args.work = Path(tmp.name)
    work = args.work.resolve()
    env = child_env(args.threads)
    cfg = demo_config()
    fit_cfg = json.dumps({"clustering": cfg["clustering"]})
    merge_cfg = json.dumps({"patches": cfg["patches"]})
    samples, patches = build_inputs(work, args.threads, env)
    if not samples or len(samples) != len(patches):
        raise SystemExit(f"expected one sample and one patch store per demo slide, got {len(samples)} and {len(patches)}")
    py = [sys.executable]
    load_start = os.getloadavg()[0]
    base = {step: measure([*py, "-c", code], work / f"imports_{step}.log", env)[1] for step, code in IMPORTS.items()}

    rows = []
    for scale in args.scales:
        run = work / f"x{scale}"
        run.mkdir(parents=True, exist_ok=True)
        s_list = write_list(cohort(samples, scale, work / "stores" / f"x{scale}" / "samples"), run / "samples.txt")
        p_list = write_list(cohort(patches, scale, work / "stores" / f"x{scale}" / "patches"), run / "patches.txt")
        for out in (run / "model", run / "patches.zarr"):
            shutil.rmtree(out, ignore_errors=True)
        fit_s, fit_mib = measure([*py, "-m", "histopipe", "fit-clusters", "--samples-list", str(s_list),
                                  "--out", str(run / "model"), "--config-json", fit_cfg], run / "fit.log", env)
        merge_s, merge_mib = measure([*py, "-m", "histopipe", "merge-patches", "--list", str(p_list),
                                      "--out", str(run / "patches.zarr"), "--config-json", merge_cfg], run / "merge.log", env)
        meta = json.loads((run / "model" / "model.json").read_text())
        merged = dict(zarr.open_group(str(run / "patches.zarr"), mode="r").attrs)
        rows.append({"scale": scale, "slides": meta["n_slides"], "tiles": meta["n_tiles_total"], "fitted": meta["n_sampled"],
                     "fit_mib": fit_mib, "fit_s": fit_s, "patches": merged["n_patches"],
                     "merge_mib": merge_mib, "merge_s": merge_s})
        shutil.rmtree(run / "patches.zarr")  # the largest output; the model and the logs stay

    load = os.getloadavg()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, 1-min load average {load_start:.1f} at the start, "
          f"{load[0]:.1f} at the end; children with OMP_NUM_THREADS={args.threads}; inputs cached in {work}")
    print(f"imports only: fit {base['fit']:.0f} MiB, merge {base['merge']:.0f} MiB")
    print()
    print("| cohort | slides | tiles | rows fitted | fit peak MiB | fit s | patches | merge peak MiB | merge s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scale']}× demo | {r['slides']} | {r['tiles']} | {r['fitted']} | {r['fit_mib']:.0f} | {r['fit_s']:.1f} "
              f"| {r['patches']} | {r['merge_mib']:.0f} | {r['merge_s']:.1f} |")
    one = rows[0]
    print()
    print("| ratio to 1× | slides (input size) | fit peak | fit peak above imports | merge peak | merge peak above imports |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        print(f"| {r['scale']}×/1× | {r['slides'] / one['slides']:.1f} | {r['fit_mib'] / one['fit_mib']:.2f} | "
              f"{above(r, one, 'fit_mib', base['fit'])} | {r['merge_mib'] / one['merge_mib']:.2f} | "
              f"{above(r, one, 'merge_mib', base['merge'])} |")
    if len(rows) > 1:
        last = rows[-1]
        extra = last["slides"] - one["slides"]
        print()
        print(f"growth from {one['slides']} to {last['slides']} slides: fit {(last['fit_mib'] - one['fit_mib']) * 1024 / extra:.0f} "
              f"KiB/slide, merge {(last['merge_mib'] - one['merge_mib']) * 1024 / extra:.0f} KiB/slide "
              f"({(last['merge_mib'] - one['merge_mib']) * 1024 / (last['patches'] - one['patches']):.1f} KiB/patch)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
