"""The ablation table: one row per synthesis variant, FD and k-NN metrics per encoder, label
and crop fidelity, and downstream DeepLabv3+ scores, gathered from the per-variant JSON files.

Column keys (TSV header) are machine-friendly: ``fd:<encoder>``, ``precision:<encoder>``,
``recall:<encoder>``, ``density:<encoder>``, ``coverage:<encoder>``; ``label_miou`` /
``label_accuracy`` (the real-arm segmenter on the row's images against their maps; the
``real`` row holds its upper bound, the ``unconditional`` row the chance level);
``crop_fidelity`` / ``crop_fidelity_outside`` (how much nearer a region lies to its own crop than to a random crop of its type); ``miou`` /
``mdice`` (model trained on the row's data alone: synthetic only, or real for the ``real``
row) and ``miou_both`` / ``mdice_both`` (trained on real + synthetic). A metric that could not
be computed is empty in the TSV and "n/a" in Markdown and HTML, with its reason in the notes.
Markdown and HTML use readable headers and mark the best value of each column.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from histopipe.atomic import atomic_write_text
from histopipe.errors import HistopipeError
from histopipe.evaluation.outputs import read_json, tsv_text

DISTRIBUTION_METRICS = ("fd", "precision", "recall", "density", "coverage")
FIDELITY_METRICS = ("label_miou", "label_accuracy", "crop_fidelity", "crop_fidelity_outside")
SEGMENTATION_METRICS = ("miou", "mdice", "miou_both", "mdice_both")
LOWER_IS_BETTER = ("fd",)
NO_BEST = ("variant", "n_synthetic", "density")
_PRETTY = {
    "fd": "FD", "precision": "precision", "recall": "recall", "density": "density",
    "coverage": "coverage", "miou": "mIoU", "mdice": "mDice",
    "miou_both": "mIoU real+syn", "mdice_both": "mDice real+syn", "n_synthetic": "n synthetic",
    "label_miou": "label fidelity mIoU", "label_accuracy": "label fidelity acc.",
    "crop_fidelity": "crop fidelity", "crop_fidelity_outside": "crop fidelity outside box",
}
_DIGITS = {"fd": 1, "n_synthetic": 0}


@dataclass
class AblationTable:
    columns: list[str]
    rows: list[dict]
    notes: list[str]

    def column_values(self, column: str) -> list[float | None]:
        return [row.get(column) for row in self.rows]


def _crop_measure(crop: dict) -> str:
    """How a fidelity JSON's crop ratio was measured, in words (older files: pooled cosine)."""
    if crop.get("features", "pooled") == "appearance":
        return (f"distances (random / own) in appearance statistics (channel means and deviations of "
                f"{crop.get('encoder')}'s first {crop.get('stages')} stages)")
    return f"cosine similarities (own / random) in {crop.get('encoder')}'s pooled features"


def assemble(results: Iterable[dict], order: Sequence[str] = ()) -> AblationTable:
    """Merge distribution and segmentation results (dicts from the metric JSONs) into rows.

    Rows follow ``order`` (variants not listed follow in order of appearance; ``real`` last).
    A (variant, metric) given twice is an error rather than a silent overwrite.
    """
    rows: dict[str, dict] = {}
    encoders: list[str] = []
    seg_cols: list[str] = []
    fid_cols: list[str] = []
    notes: set[str] = set()
    for res in results:
        kind, variant = res.get("kind"), res.get("variant")
        if kind not in ("distribution", "segmentation", "fidelity") or not variant:
            raise HistopipeError(f"{res.get('_path', 'input')}: not a histopipe metrics file")
        row = rows.setdefault(variant, {"variant": variant})

        def put(key, value, res=res, row=row, variant=variant):
            if key in row:
                raise HistopipeError(f"{res.get('_path')}: {variant} {key} given twice")
            row[key] = value

        if kind == "distribution":
            put("n_synthetic", res["synthetic"]["n_used"])
            for name, enc in res["encoders"].items():
                if name not in encoders:
                    encoders.append(name)
                for metric in DISTRIBUTION_METRICS:
                    put(f"{metric}:{name}", enc[metric])
                for metric, reason in enc.get("reasons", {}).items():
                    notes.add(f"{variant}, {metric} ({name}): n/a, {reason}")
            indep = res.get("knn_independent") or {}
            notes.add(
                f"FD and k-NN metrics (k={res['knn_k']}, seed {res['seed']}) against "
                f"{res['real']['n_used']} real {res['real']['split']} patches"
                + ("; k-NN radii skip overlapping patches" if indep.get("real") else "")
            )
            if variant == "real":
                notes.add(
                    f"real row, FD and k-NN metrics: {res['synthetic']['n_used']} real "
                    f"{res['synthetic']['split']} patches (other slides) in the synthetic images' place"
                )
        elif kind == "fidelity":
            label, crop = res["label"], res["crop"]
            values = {"label_miou": label.get("miou"), "label_accuracy": label.get("pixel_accuracy"),
                      "crop_fidelity": crop.get("ratio"), "crop_fidelity_outside": crop.get("ratio_outside")}
            for metric, value in values.items():
                put(metric, value)
                if metric not in fid_cols:
                    fid_cols.append(metric)
            for what, reason in (("label fidelity", label.get("reason")), ("crop fidelity", crop.get("reason")),
                                 ("crop fidelity outside the box", crop.get("reason_outside"))):
                if reason:
                    notes.add(f"{variant}, {what}: n/a, {reason}")
            notes.add(
                f"Label fidelity: the real-arm segmenter on each synthetic image against its own map "
                f"(real row: on the real test patches, the upper bound; unconditional row: the chance "
                "level). Crop fidelity: how much nearer each synthesised region lies to its conditioning "
                f"crop than to a random crop of the type from another slide, as the ratio of {_crop_measure(crop)} "
                "(> 1: the crops are used; 'outside box': the crop's own box cut out of the region; "
                "real row: the real patches with their own crops)"
            )
        else:
            suffix = "_both" if res["mode"] == "both" else ""
            for metric in ("miou", "mdice"):
                put(metric + suffix, res[metric])
                if metric + suffix not in seg_cols:
                    seg_cols.append(metric + suffix)
            s = res["settings"]
            notes.add(
                f"DeepLabv3+ ({s['encoder']}, {s['steps']} steps x {s['batch_size']}, seed "
                f"{res['seed']}) tested on {res['test']['n_used']} real test patches"
            )
    seg_cols.sort(key=SEGMENTATION_METRICS.index)
    fid_cols.sort(key=FIDELITY_METRICS.index)
    columns = ["variant"]
    if encoders:
        columns.append("n_synthetic")
    columns += [f"{m}:{e}" for m in DISTRIBUTION_METRICS for e in encoders] + fid_cols + seg_cols
    ranked = [v for v in order if v in rows]
    ranked += [v for v in rows if v not in ranked and v != "real"]
    if "real" in rows and "real" not in ranked:
        ranked.append("real")
    return AblationTable(columns, [rows[v] for v in ranked], sorted(notes))


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    out = []
    for path in paths:
        res = read_json(path)
        res["_path"] = str(path)
        out.append(res)
    return out


def header(column: str) -> str:
    metric, _, encoder = column.partition(":")
    name = _PRETTY.get(metric, metric)
    return f"{name} ({encoder})" if encoder else name


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    digits = _DIGITS.get(column.partition(":")[0], 3)
    return f"{value:.{digits}f}"


def _best(table: AblationTable, column: str) -> float | None:
    """The best value of a column among the synthetic variants (the real row is their
    reference), or None where "best" means nothing: density (ideal 1, not maximal), counts,
    or a column whose values are all equal."""
    values = [r.get(column) for r in table.rows if r.get("variant") != "real"]
    values = [v for v in values if isinstance(v, (int, float))]
    if column.partition(":")[0] in NO_BEST or len(set(values)) < 2:
        return None
    lower = column.partition(":")[0] in LOWER_IS_BETTER
    return min(values) if lower else max(values)


def to_markdown(table: AblationTable) -> str:
    lines = ["| " + " | ".join(header(c) for c in table.columns) + " |",
             "|" + "|".join("---" if c == "variant" else "---:" for c in table.columns) + "|"]
    for row in table.rows:
        cells = []
        for c in table.columns:
            text = _cell(c, row.get(c))
            best = _best(table, c)
            cells.append(f"**{text}**" if best is not None and row.get(c) == best else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def to_html(table: AblationTable, title: str = "Ablation: synthesis variants") -> str:
    """A self-contained HTML page (inline CSS) holding the table and its notes."""
    head = "".join(f"<th>{html.escape(header(c))}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for c in table.columns:
            text = html.escape(_cell(c, row.get(c)))
            best = _best(table, c)
            cls = ' class="best"' if best is not None and row.get(c) == best else ""
            tag = "th" if c == "variant" else "td"
            cells.append(f"<{tag}{cls}>{text}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
        "th,td{border:1px solid #bbb;padding:3px 8px}td{text-align:right}"
        ".best{font-weight:bold;background:#e6f4e6}caption{text-align:left;margin-bottom:6px}"
        "</style></head><body>"
        f"<table><caption><b>{html.escape(title)}</b>. FD: Fréchet distance (lower is better); "
        "precision, recall, coverage: k-NN manifold metrics (higher is better); density: 1 when "
        "synthetic samples crowd real regions as real ones do; mIoU, "
        "mDice: DeepLabv3+ on the real test split. Best value per column highlighted.</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<ul>{notes}</ul></body></html>\n"
    )


def write_table(table: AblationTable, outputs: Iterable[str | Path]) -> None:
    """Write the table in the format named by each output's suffix (.tsv, .md, .html, .png)."""
    for out in outputs:
        out = Path(out)
        if out.suffix == ".tsv":
            atomic_write_text(out, tsv_text(table.rows, table.columns))
        elif out.suffix == ".md":
            atomic_write_text(out, to_markdown(table))
        elif out.suffix in (".html", ".htm"):
            atomic_write_text(out, to_html(table))
        elif out.suffix == ".png":
            from histopipe.evaluation.figures import table_png

            table_png(table, out)
        else:
            raise HistopipeError(f"{out}: unknown table format (use .tsv, .md, .html or .png)")


def read_tsv_table(path: str | Path) -> AblationTable:
    """Read a table written as TSV back (numbers as floats, empty cells as None)."""
    path = Path(path)
    if not path.is_file():
        raise HistopipeError(f"{path}: file not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = list(reader.fieldnames or [])
        rows = []
        for raw in reader:
            row = {}
            for c in columns:
                text = raw.get(c) or ""
                if c == "variant":
                    row[c] = text
                else:
                    try:
                        row[c] = float(text) if text else None
                    except ValueError:
                        row[c] = text
            rows.append(row)
    if "variant" not in columns:
        raise HistopipeError(f"{path}: no `variant` column; not an ablation table")
    return AblationTable(columns, rows, [])
