"""Guidance settings of a trained model, compared on the quality run's held-out maps.

Re-samples one variant of a finished `make quality` results folder with each given guidance
scale and null branch (the same maps, crops and seeds as its synthesize job), then scores
every sample set as the evaluation stage does: FD, precision and recall (k-NN manifolds),
label fidelity (the real-arm segmenter) and crop fidelity. Prints a Markdown table.

    python benchmarks/guidance.py results/quality --variant map_crops \\
        --settings 1.0:map_and_crops 2.0:map_and_crops 2.0:crops --work /tmp/guidance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histopipe.config import load_config  # noqa: E402

# The configs `make quality` lays over config/config.yaml, in order.
QUALITY_CONFIGS = ("config/demo.yaml", "config/presets/cpu.yaml", "config/quality.yaml")


def merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def histopipe(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "histopipe", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"histopipe {args[0]} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a finished make quality results folder")
    ap.add_argument("--variant", default="map_crops")
    ap.add_argument("--settings", nargs="+", default=["1.0:map_and_crops", "2.0:map_and_crops", "2.0:crops"],
                    help="guidance_scale:guidance_null pairs")
    ap.add_argument("--work", type=Path, default=Path("guidance_sweep"))
    args = ap.parse_args()
    over: dict = {}
    for name in QUALITY_CONFIGS:
        merge(over, yaml.safe_load((ROOT / name).read_text()) or {})
    cfg = load_config(ROOT / "config" / "config.yaml", over)
    dataset = next((args.results / "dataset").glob("*/patches.zarr"))
    name = dataset.parent.name
    model = args.results / "models" / name / f"ldm_{args.variant}" / "model"
    segmenter = args.results / "evaluation" / name / "segmentation" / "real" / "segmenter.pt"
    bank = dataset.parent / "crop_bank.zarr"
    evaluation = json.dumps({"evaluation": cfg["evaluation"]})
    print(f"{model}: {len(args.settings)} settings, held-out split {cfg['evaluation']['real_split']}")
    print("| guidance | null branch | FD | precision | recall | label fidelity mIoU | crop fidelity |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for spec in args.settings:
        scale, null = spec.split(":")
        out = args.work / f"{args.variant}_g{scale}_{null}"
        synthesis = {**cfg["synthesis"], "guidance_scale": float(scale), "guidance_null": null}
        if not (out / "manifest.json").is_file():
            histopipe("synthesize", "--model", str(model), "--out", str(out), "--mode", "held-out", "--dataset", str(dataset),
                      "--split", cfg["evaluation"]["real_split"], "--config-json", json.dumps({"synthesis": synthesis}))
        store = str(out / "synthetic.zarr")
        histopipe("evaluate-distribution", "--real", str(dataset), "--synthetic", store, "--variant", args.variant,
                  "--out", str(out / "distribution.json"), "--tsv", str(out / "distribution.tsv"), "--config-json", evaluation)
        histopipe("evaluate-fidelity", "--synthetic", store, "--real", str(dataset), "--segmenter", str(segmenter),
                  "--crop-bank", str(bank), "--variant", args.variant, "--out", str(out / "fidelity.json"),
                  "--config-json", evaluation)
        head, row = (line.split("\t") for line in (out / "distribution.tsv").read_text().splitlines()[:2])
        d = dict(zip(head, row, strict=True))
        f = json.loads((out / "fidelity.json").read_text())
        print(f"| {scale} | {null} | {float(d['fd']):.1f} | {float(d['precision']):.3f} | {float(d['recall']):.3f} | "
              f"{f['label']['miou']:.3f} | {f['crop']['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
