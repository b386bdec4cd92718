"""The quality run's models with more compute: is the CPU run's ceiling its budget or its design?

    python benchmarks/quality_gpu.py --results results/quality --out results/quality_gpu
    python benchmarks/quality_gpu.py ... --smoke        # CPU, a few steps per run (checks the script)

Starts from a finished (or partly finished) ``make quality`` tree: its patch dataset, its VAE,
its real-arm segmenter and its crop bank. Trains several LDM runs side by side on one GPU (the
quality preset's models are far too small to fill it), each for at most ``--train-seconds``;
a run stopped by that limit is evaluated from its newest checkpoint (EMA weights, as every
checkpoint exports them). Every run is then synthesised on the quality run's held-out maps
and scored exactly as the workflow scores a variant: FD, precision/recall (k = 5), label
fidelity, crop fidelity. Writes ``<out>/quality_gpu.json`` and ``<out>/quality_gpu.md`` (the
table, the progress evaluations of every run and the machine).

The runs (``RUNS``): the quality preset as it is (3 000 steps of 16, the CPU figure's twin),
then longer, larger-batch and wider versions of the map_crops model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histopipe.config import deep_merge, load_configs  # noqa: E402
from histopipe.diffusion.training import MODEL_DIR, complete_checkpoints, read_progress  # noqa: E402

CONFIGS = ["config/config.yaml", "config/demo.yaml", "config/presets/cpu.yaml", "config/quality.yaml"]

# name → (variant, ldm overrides). Steps count optimizer steps; the cosine schedule spans them.
RUNS: dict[str, tuple[str, dict]] = {
    "preset (3k x 16)": ("map_crops", {}),
    "3k x 64": ("map_crops", {"batch_size": 64}),
    "8k x 16": ("map_crops", {"max_steps": 8000}),
    "8k x 64": ("map_crops", {"max_steps": 8000, "batch_size": 64}),
    "wide UNet 64-128-256 x2, 8k x 64": (
        "map_crops",
        {"max_steps": 8000, "batch_size": 64, "block_out_channels": [64, 128, 256], "layers_per_block": 2,
         "cross_attention_dim": 128, "condition_channels": 64},
    ),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def histopipe(*args: str, log: Path, timeout: float | None = None, env: dict | None = None) -> int:
    cmd = [sys.executable, "-m", "histopipe", *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return -1


def newest_model(work: Path, progress: list[dict]) -> tuple[Path | None, int]:
    """The finished export, else the newest complete checkpoint's (EMA) export, and its step."""
    if (work / MODEL_DIR / "model_index.json").is_file():
        return work / MODEL_DIR, max((p["step"] for p in progress), default=-1)
    done = complete_checkpoints(work / "checkpoints")
    return (done[-1][1] / MODEL_DIR, done[-1][0]) if done else (None, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results/quality"))
    ap.add_argument("--out", type=Path, default=Path("results/quality_gpu"))
    ap.add_argument("--train-seconds", type=float, default=300.0, help="wall-clock limit of every training run")
    ap.add_argument("--runs", nargs="*", default=None, help="run names (default: all of RUNS)")
    ap.add_argument("--smoke", action="store_true", help="CPU, a few steps per run, few images: checks the script")
    args = ap.parse_args(argv)
    args.results, args.out = args.results.resolve(), args.out.resolve()

    cfg = load_configs(ROOT / name for name in CONFIGS)
    ds = next(iter(sorted(args.results.glob("dataset/*/patches.zarr"))), None)
    vae = next(iter(sorted(args.results.glob("models/*/vae/model"))), None)
    crop_bank = next(iter(sorted(args.results.glob("dataset/*/crop_bank.zarr"))), None)
    if None in (ds, vae, crop_bank):
        raise SystemExit(f"{args.results}: needs the patch dataset, its crop bank and the VAE model "
                         f"(found {ds}, {crop_bank}, {vae}); run the quality run up to train_vae and build_crop_bank")
    print(f"dataset {ds}\nvae {vae}\ncrop bank {crop_bank}", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    start = time.time()
    evaluation = dict(cfg["evaluation"])
    if args.smoke:
        evaluation.update(knn_k=2, segmentation={**evaluation["segmentation"], "steps": 2, "batch_size": 4})
    ev = json.dumps({"evaluation": evaluation})
    # The label-fidelity judge: the quality run's real arm, or the same training here (the
    # model file is too large to travel with the tree).
    segmenter = next(iter(sorted(args.results.glob("evaluation/*/segmentation/real/segmenter.pt"))), None)
    if segmenter is None:
        segmenter = out / "segmenter" / "segmenter.pt"
        segmenter.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        histopipe("evaluate-segmentation", "--train-real", str(ds), "--mode", "real", "--variant", "real",
                  "--out", str(segmenter.parent / "real.json"), "--model-out", str(segmenter), "--config-json", ev,
                  log=segmenter.parent / "segmenter.log", env=env)
        if not segmenter.is_file():
            raise SystemExit(f"{segmenter}: the segmenter did not train (see segmenter.log)")
        print(f"segmenter trained in {time.time() - t0:.0f} s", flush=True)
    runs = {k: v for k, v in RUNS.items() if args.runs is None or k in args.runs}

    def train(name: str) -> tuple[str, float]:
        variant, over = runs[name]
        ldm = deep_merge(cfg["ldm"], {**over, "variant": variant, "checkpoint_every": 1000, "eval_every": 1000,
                                      "sample_every": 0, "num_workers": 2})
        if args.smoke:
            ldm.update(max_steps=4, batch_size=4, checkpoint_every=2, eval_every=2, eval_samples=8, num_workers=0)
        work = out / slug(name)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        rc = histopipe("train-ldm", "--dataset", str(ds), "--vae", str(vae), "--out", str(work), "--segmenter", str(segmenter),
                       "--config-json", json.dumps({"ldm": ldm}), log=work / "train.log", timeout=args.train_seconds, env=env)
        print(f"{name}: training rc {rc} after {time.time() - t0:.0f} s", flush=True)
        return name, time.time() - t0

    with ThreadPoolExecutor(len(runs)) as pool:
        train_wall = dict(pool.map(train, runs))

    synthesis = dict(cfg["synthesis"])
    if args.smoke:
        synthesis.update(limit=8, steps=2, batch_size=4, held_out_repeats=1)

    def evaluate(name: str) -> dict:
        work = out / slug(name)
        progress = read_progress(work)
        model, step = newest_model(work, progress)
        row = {"run": name, "variant": runs[name][0], "overrides": runs[name][1], "train_s": round(train_wall[name], 1),
               "step": step, "progress": progress}
        if model is None:
            row["error"] = "no model or checkpoint (see train.log)"
            return row
        syn = work / "synthetic"
        shutil.rmtree(syn, ignore_errors=True)
        log = work / "eval.log"
        rc = histopipe("synthesize", "--model", str(model), "--out", str(syn), "--mode", "held-out", "--dataset", str(ds),
                       "--split", cfg["evaluation"].get("real_split", "test"), "--config-json", json.dumps({"synthesis": synthesis}),
                       log=log, env=env)
        store = next(iter(sorted(syn.glob("*.zarr"))), None)
        if rc != 0 or store is None:
            row["error"] = f"synthesis failed (rc {rc}, see eval.log)"
            return row
        histopipe("evaluate-distribution", "--real", str(ds), "--synthetic", str(store), "--variant", runs[name][0],
                  "--out", str(work / "distribution.json"), "--tsv", str(work / "distribution.tsv"), "--config-json", ev, log=log, env=env)
        histopipe("evaluate-fidelity", "--synthetic", str(store), "--real", str(ds), "--segmenter", str(segmenter),
                  "--crop-bank", str(crop_bank), "--variant", runs[name][0], "--out", str(work / "fidelity.json"),
                  "--config-json", ev, log=log, env=env)
        for part in ("distribution", "fidelity"):
            p = work / f"{part}.json"
            row[part] = json.loads(p.read_text()) if p.is_file() else None
        return row

    with ThreadPoolExecutor(len(runs)) as pool:
        rows = list(pool.map(evaluate, runs))

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpus": os.cpu_count(),
            "wall_s": round(time.time() - start, 1), "train_seconds_limit": args.train_seconds}
    (out / "quality_gpu.json").write_text(json.dumps({"machine": info, "runs": rows}, indent=1, default=str))
    (out / "quality_gpu.md").write_text(render(info, rows))
    print(render(info, rows), flush=True)
    return 0


def _encoder_scores(d: dict | None) -> dict:
    """The first encoder's scores of an evaluate-distribution JSON (the quality config has one)."""
    return next(iter(((d or {}).get("encoders") or {}).values()), {})


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def render(info: dict, rows: list[dict]) -> str:
    lines = [f"Machine: {info}", "",
             "| run | steps reached | train s | FD | precision | recall | label fidelity mIoU | crop fidelity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, f = _encoder_scores(r.get("distribution")), r.get("fidelity")
        lines.append("| " + " | ".join([r["run"], str(r["step"]), str(r["train_s"]), _fmt(d.get("fd")),
                                         _fmt(d.get("precision")), _fmt(d.get("recall")), _fmt(((f or {}).get("label") or {}).get("miou")),
                                         _fmt(((f or {}).get("crop") or {}).get("ratio"))]) + " |" + (f" {r['error']}" if "error" in r else ""))
    lines += ["", "Progress evaluations (EMA, 64 val maps): step: FD / label fidelity", ""]
    for r in rows:
        pts = ", ".join(f"{p['step']}: {_fmt(p.get('fd'))} / {_fmt(p.get('label_miou', p.get('miou')))}" for p in r["progress"])
        lines.append(f"- {r['run']}: {pts}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
