"""Guidance and sampler settings of a trained model, compared on the quality run's held-out maps.

Re-samples one variant of a finished `make quality` results folder with each given guidance
scale and null branch, and optionally sampler and step count (the same maps, crops and seeds
as its synthesize job; unnamed parts keep the run's synthesis settings), then scores
every sample set as the evaluation stage does: FD, precision and recall (k-NN manifolds),
label fidelity (the real-arm segmenter) and crop fidelity. Prints a Markdown table.

    python benchmarks/guidance.py results/quality --variant map_crops \\
        --settings 1.0:map_and_crops 2.0:map_and_crops 2.0:crops 2.0:map_and_crops:dpmpp_sde:50 \\
        --work /tmp/guidance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histopipe.config import load_configs  # noqa: E402

# The configs `make quality` lays over config/config.yaml, in order.
QUALITY_CONFIGS = ("config/config.yaml", "config/demo.yaml", "config/presets/cpu.yaml", "config/quality.yaml")


def histopipe(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "histopipe", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"histopipe {args[0]} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a finished make quality results folder")
    ap.add_argument("--variant", default="map_crops")
    ap.add_argument("--settings", nargs="+", default=["1.0:map_and_crops", "2.0:map_and_crops", "2.0:crops"],
                    help="guidance_scale:guidance_null[:sampler[:steps]]")
    ap.add_argument("--work", type=Path, default=Path("guidance_sweep"))
    args = ap.parse_args()
    cfg = load_configs(ROOT / name for name in QUALITY_CONFIGS)
    dataset = next((args.results / "dataset").glob("*/patches.zarr"))
    name = dataset.parent.name
    model = args.results / "models" / name / f"ldm_{args.variant}" / "model"
    segmenter = args.results / "evaluation" / name / "segmentation" / "real" / "segmenter.pt"
    bank = dataset.parent / "crop_bank.zarr"
    evaluation = json.dumps({"evaluation": cfg["evaluation"]})
    print(f"{model}: {len(args.settings)} settings, held-out split {cfg['evaluation']['real_split']}")
    print("| guidance | null branch | sampler | steps | FD | precision | recall | label fidelity mIoU | crop fidelity |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.settings:
        scale, null, *rest = spec.split(":")
        sampler = rest[0] if rest else cfg["synthesis"]["sampler"]
        steps = int(rest[1]) if len(rest) > 1 else int(cfg["synthesis"]["steps"])
        out = args.work / f"{args.variant}_g{scale}_{null}_{sampler}{steps}"
        synthesis = {**cfg["synthesis"], "guidance_scale": float(scale), "guidance_null": null,
                     "sampler": sampler, "steps": steps}
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
        print(f"| {scale} | {null} | {sampler} | {steps} | {float(d['fd']):.1f} | {float(d['precision']):.3f} | {float(d['recall']):.3f} | "
              f"{f['label']['miou']:.3f} | {f['crop']['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
