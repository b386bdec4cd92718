"""The quality run's summary: does the generative core learn tissue, follow its maps and use
its crops? Reads a finished `make quality` results folder and prints (and writes as Markdown)
the ablation table, each model's progress from its first checkpoint to its last, the targets
and whether they are met, and where the time went.

    python benchmarks/quality.py results/quality --out benchmarks/quality

Targets (best variant unless said): FD at most 1/3 of the same model's FD at its first
checkpoint (the progress evaluations, same held-out maps and seeds); precision and recall
each at least 0.3 (k = 5); label fidelity of the map-conditioned variants at least 0.6 x the
real upper bound and at least 2 x the chance level (unconditional); crop fidelity of
map_crops above 1.2.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histopipe.diffusion.training import read_progress  # noqa: E402
from histopipe.evaluation.ablation import read_tsv_table, to_markdown  # noqa: E402

MAP_VARIANTS = ("map", "map_crop_embeddings", "map_crops")


def _one(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{root}: expected one {pattern}, found {len(found)} (did `make quality` finish?)")
    return found[0]


def progress_rows(models: Path) -> list[dict]:
    rows = []
    for work in sorted(p for p in models.iterdir() if p.is_dir()):
        records = read_progress(work)
        with_fd = [r for r in records if "fd" in r]
        if not with_fd:
            continue
        first, last = with_fd[0], with_fd[-1]
        row = {"model": work.name, "first_step": first["step"], "fd_first": first["fd"], "last_step": last["step"],
               "fd_last": last["fd"], "fd_ratio": last["fd"] / first["fd"]}
        if "fd_real" in last:
            row["fd_real"] = last["fd_real"]
        for key in ("label_miou", "psnr"):
            if key in last:
                row[f"{key}_first"], row[f"{key}_last"] = first.get(key), last[key]
        rows.append(row)
    return rows


def estimator_rows(evaluation: Path) -> list[str]:
    """Precision/recall/density/coverage with radii that skip overlapping patches (the table's)
    against the plain estimator's, per variant and encoder, from the distribution JSONs."""
    lines = []
    for path in sorted((evaluation / "distribution").glob("*.json")):
        result = json.loads(path.read_text())
        for name, enc in result["encoders"].items():
            plain = enc.get("plain") or {}
            cells = [f"{_fmt(enc.get(m))} / {_fmt(plain.get(m))}" for m in ("precision", "recall", "density", "coverage")]
            lines.append(f"| {result['variant']} | {name} | " + " | ".join(cells) + " |")
    return lines


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def benchmark_minutes(results: Path) -> dict[str, float]:
    """Wall minutes per rule from Snakemake's benchmark files (jobs of a rule summed)."""
    out: dict[str, float] = {}
    for tsv in (results / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            out[rule] = out.get(rule, 0.0) + float(rows[-1]["s"]) / 60
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def targets(table, progress: list[dict]) -> list[tuple[str, str, bool | None]]:
    rows = {r["variant"]: r for r in table.rows}
    enc = next(c.partition(":")[2] for c in table.columns if c.startswith("fd:"))
    synth = [v for v in rows if v != "real"]

    def best(column, lower=False):
        values = [(rows[v].get(column), v) for v in synth if rows[v].get(column) is not None]
        return (min if lower else max)(values) if values else (None, None)

    out = []
    ratios = {p["model"][len("ldm_"):]: p["fd_ratio"] for p in progress if p["model"].startswith("ldm_")}
    if ratios:
        v = min(ratios, key=ratios.get)
        out.append(("FD at most 1/3 of the first checkpoint's (progress FD)", f"{ratios[v]:.2f} ({v})", ratios[v] <= 1 / 3))
    for metric in ("precision", "recall"):
        value, v = best(f"{metric}:{enc}")
        out.append((f"{metric} ≥ 0.3 (k = 5, {enc})", "n/a" if value is None else f"{value:.3f} ({v})",
                    None if value is None else value >= 0.3))
    real, chance = rows.get("real", {}).get("label_miou"), rows.get("unconditional", {}).get("label_miou")
    for v in MAP_VARIANTS:
        value = rows.get(v, {}).get("label_miou")
        if value is None or real is None or chance is None:
            continue
        out.append((f"label fidelity of {v} ≥ 0.6 × real ({real:.3f}) and ≥ 2 × chance ({chance:.3f})",
                    f"{value:.3f} ({value / real:.2f} × real, {value / chance:.1f} × chance)",
                    value >= 0.6 * real and value >= 2 * chance))
    crop = rows.get("map_crops", {}).get("crop_fidelity")
    if crop is not None:
        ref = rows.get("real", {}).get("crop_fidelity")
        extra = f"; real patches with their own crops: {ref:.3f}" if ref is not None else ""
        out.append(("crop fidelity of map_crops > 1.2", f"{crop:.3f}{extra}", crop > 1.2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results folder of `make quality`")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT_variants.png there")
    args = parser.parse_args()
    table = read_tsv_table(_one("evaluation/*/ablation.tsv", args.results))
    progress = progress_rows(_one("models/*", args.results))
    lines = ["## Ablation (held-out test maps)", "", to_markdown(table), "## Progress (first → last evaluation)", "",
             "| model | steps | FD | FD ratio | FD of other real patches | label fidelity mIoU | PSNR |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for p in progress:
        label = f"{p['label_miou_first']:.3f} → {p['label_miou_last']:.3f}" if "label_miou_last" in p else "–"
        psnr = f"{p['psnr_first']:.1f} → {p['psnr_last']:.1f}" if "psnr_last" in p else "–"
        floor = f"{p['fd_real']:.1f}" if "fd_real" in p else "–"
        lines.append(f"| {p['model']} | {p['first_step']} → {p['last_step']} | {p['fd_first']:.1f} → {p['fd_last']:.1f} | "
                     f"{p['fd_ratio']:.2f} | {floor} | {label} | {psnr} |")
    lines += ["", "## k-NN metrics: radii that skip overlapping patches / plain radii", "",
              "| variant | encoder | precision | recall | density | coverage |", "|---|---|---:|---:|---:|---:|"]
    lines += estimator_rows(_one("evaluation/*", args.results))
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, met in targets(table, progress):
        lines.append(f"| {name} | {value} | {'n/a' if met is None else ('yes' if met else 'no')} |")
    minutes = benchmark_minutes(args.results)
    lines += ["", "## Time per rule (job wall minutes, summed over the rule's jobs)", "", "| rule | minutes |", "|---|---:|"]
    lines += [f"| {rule} | {m:.1f} |" for rule, m in minutes.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(text)
        shutil.copyfile(_one("evaluation/*/figures/variants.png", args.results), f"{args.out}_variants.png")


if __name__ == "__main__":
    main()
