"""The cohort's per-slide table and the bounded selection of slide images for the report.

A report that embeds every slide's map grows with the cohort (about 1 MB per slide). The
report instead gets one searchable table of every slide (status, tiles, tissue area, QC
flags, failure reason, tissue-type histogram, where its map PNG is on disk) and the images of
at most ``max_slides`` slides, chosen so that every failure kind, every outlier flag and
every tissue type is shown at least once (:func:`select_slides`). Every map PNG stays on disk.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histopipe.atomic import atomic_write_bytes, atomic_write_text
from histopipe.status import store_attrs

# A tissue type counts as shown by a slide when it covers at least this fraction of the
# slide's tissue cells.
PRESENT_FRACTION = 0.02
# Robust z-score (median / 1.4826 MAD of log values) beyond which a slide is an outlier.
OUTLIER_Z = 3.5
# A slide is flagged `blurry` when more than this share of its tiles are.
BLURRY_SHARE = 0.1


@dataclass
class SlideRow:
    slide_id: str
    status: str  # ok | empty | failed
    n_tiles: int
    tissue_mm2: float  # tissue-mask area, mm²; nan when unknown
    reason: str
    types: np.ndarray  # (k,) fraction of the slide's tissue cells per tissue type
    map_png: str
    qc_png: str
    flags: list[str] = field(default_factory=list)
    ink_mm2: float = 0.0  # pen-ink area excluded from the tissue, mm²
    n_blurry: int = 0  # tiles below tiling.min_sharpness
    stain: dict[str, float] = field(default_factory=dict)  # stain_hue (°), stain_saturation, stain_value


def read_rows(tile_stores: list[str], map_stores: list[str], qc_dirs: list[str]) -> list[SlideRow]:
    """One row per slide from its tile store attributes and its map (finest level)."""
    import zarr

    rows = []
    k = 0
    for tiles, map_store, qc in zip(tile_stores, map_stores, qc_dirs, strict=True):
        a = store_attrs(tiles) or {}
        sid = Path(tiles).name.removesuffix(".zarr")  # the sheet's id: stores are named by it
        hist = np.zeros(0)
        if Path(map_store).is_dir():  # else a slide without a map: an empty histogram
            g = zarr.open_group(str(map_store), mode="r")
            labels = np.asarray(g["map"][0])
            n = int(g.attrs.get("num_labels", int(labels.max()) + 1)) - 1
            k = max(k, n)
            counts = np.bincount(labels.ravel().astype(np.int64), minlength=n + 1)[1:].astype(float)
            hist = counts / counts.sum() if counts.sum() else counts
        mpp = a.get("slide_mpp")
        area = float("nan")
        if mpp and a.get("level0_width") and "tissue_area_fraction" in a:
            area = float(a["tissue_area_fraction"]) * a["level0_width"] * a["level0_height"] * float(mpp) ** 2 / 1e6
        png = str(Path(map_store).with_suffix(".png"))
        qc_png = str(Path(qc) / f"{sid}.tissue.png")
        row = SlideRow(sid, str(a.get("status", "failed" if not a else "ok")), int(a.get("n_tiles", 0)), area,
                       " ".join(str(a.get("reason") or "").split()), hist, png, qc_png)
        row.ink_mm2, row.n_blurry = float(a.get("ink_area_mm2") or 0.0), int(a.get("n_blurry") or 0)
        row.stain = {k: float(a[k]) for k in ("stain_hue", "stain_saturation", "stain_value") if k in a}
        if row.ink_mm2 > 0:
            row.flags.append("ink")
        if row.n_tiles and row.n_blurry > BLURRY_SHARE * row.n_tiles:
            row.flags.append("blurry")
        rows.append(row)
    for r in rows:  # one length for every histogram
        r.types = np.pad(r.types, (0, max(0, k - len(r.types))))[:k]
    return rows


def flag_outliers(rows: list[SlideRow], z: float = OUTLIER_Z) -> None:
    """Add ``<measure>_low`` / ``<measure>_high`` flags to slides whose tile count, tissue
    area (robust z-score of the log value beyond ``z``) or stain statistics (mean hue,
    saturation, value of the tissue; robust z-score of the value) are far from the cohort's."""
    ok = [r for r in rows if r.status == "ok"]
    nan = float("nan")
    measures = (("tiles", lambda r: r.n_tiles, True), ("tissue_area", lambda r: r.tissue_mm2, True),
                ("stain_hue", lambda r: r.stain.get("stain_hue", nan), False),
                ("stain_saturation", lambda r: r.stain.get("stain_saturation", nan), False),
                ("stain_value", lambda r: r.stain.get("stain_value", nan), False))
    for name, get, use_log in measures:
        values = np.array([get(r) for r in ok], dtype=float)
        good = np.isfinite(values) & (values > 0)
        if good.sum() < 5:
            continue  # too few slides for a cohort distribution
        logs = np.log(values[good]) if use_log else values[good]
        med = np.median(logs)
        mad = 1.4826 * np.median(np.abs(logs - med))
        if mad <= 0:
            continue
        for r, v in zip((r for r, g in zip(ok, good, strict=True) if g), logs, strict=True):
            score = (v - med) / mad
            if abs(score) > z:
                r.flags.append(f"{name}_{'high' if score > 0 else 'low'}")


def failure_kind(row: SlideRow) -> str:
    """A failure's kind: its status and reason without paths, ids and numbers."""
    reason = re.sub(r"\S*/\S*", "<path>", row.reason)
    reason = re.sub(re.escape(row.slide_id), "<slide>", reason) if row.slide_id else reason
    return f"{row.status}: {re.sub(r'[0-9]+', 'N', reason)}"


def select_slides(rows: list[SlideRow], max_slides: int) -> dict[str, str]:
    """At most ``max_slides`` slides for the report's images, each with why it was chosen.

    In this order: one slide per failure kind (at most a quarter of the budget), one per
    outlier flag (at most a quarter), then slides that cover every tissue type (greedy: the
    slide showing most types not yet shown, rarest type first on ties), then slides evenly
    spaced over the sheet until the budget is spent. Deterministic.
    """
    chosen: dict[str, str] = {}

    def take(row: SlideRow, why: str) -> None:
        if len(chosen) < max_slides and row.slide_id not in chosen:
            chosen[row.slide_id] = why

    kinds: dict[str, SlideRow] = {}
    for r in rows:
        if r.status != "ok":
            kinds.setdefault(failure_kind(r), r)
    for kind, r in list(kinds.items())[: max(1, max_slides // 4)]:
        take(r, f"failure ({kind})")
    flags: dict[str, SlideRow] = {}
    for r in rows:
        for f in r.flags:
            flags.setdefault(f, r)
    quota = len(chosen) + max(1, max_slides // 4)
    for f, r in flags.items():
        if len(chosen) < quota:
            take(r, f"outlier ({f})")
    ok = [r for r in rows if r.status == "ok" and r.types.size]
    if ok:
        present = np.stack([r.types >= PRESENT_FRACTION for r in ok])
        # Rare types weigh more, so that ties go to the slide showing the rarest.
        weight = 1.0 / np.maximum(present.sum(0), 1)
        uncovered = present.any(0)
        for r in ok:
            if r.slide_id in chosen:
                uncovered &= ~(r.types >= PRESENT_FRACTION)
        while uncovered.any() and len(chosen) < max_slides:
            gain = present[:, uncovered].sum(1) + (present[:, uncovered] * weight[uncovered]).sum(1) / (weight.sum() + 1)
            i = int(np.argmax(gain))
            if gain[i] <= 0:
                break
            types = np.flatnonzero(present[i] & uncovered)
            take(ok[i], "tissue types " + ", ".join(str(t) for t in types[:8]) + (" …" if len(types) > 8 else ""))
            uncovered &= ~present[i]
    rest = [r for r in rows if r.slide_id not in chosen and r.status == "ok"]
    n = max_slides - len(chosen)
    if n > 0 and rest:
        for i in np.linspace(0, len(rest) - 1, min(n, len(rest))).round().astype(int):
            take(rest[int(i)], "spread over the sheet")
    return chosen


def _top_types(types: np.ndarray, n: int = 5) -> str:
    order = np.argsort(-types, kind="stable")[:n]
    return " ".join(f"t{t}:{types[t]:.0%}" for t in order if types[t] > 0)


COLUMNS = ("slide_id", "status", "n_tiles", "tissue_mm2", "qc_flags", "reason", "ink_mm2", "blurry_tiles", "stain_hsv",
           "top_types", "in_report", "map_png", "tissue_png", "type_fractions")


def table_rows(rows: list[SlideRow], chosen: dict[str, str]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append([r.slide_id, r.status, str(r.n_tiles), "" if not np.isfinite(r.tissue_mm2) else f"{r.tissue_mm2:.2f}",
                    ",".join(r.flags), r.reason, f"{r.ink_mm2:g}", str(r.n_blurry),
                    " ".join(f"{r.stain[k]:.3g}" for k in ("stain_hue", "stain_saturation", "stain_value") if k in r.stain),
                    _top_types(r.types), chosen.get(r.slide_id, ""), r.map_png, r.qc_png,
                    ",".join(f"{v:.3f}" for v in r.types)])
    return out


def write_tsv(rows: list[SlideRow], chosen: dict[str, str], out: str | Path) -> None:
    lines = ["\t".join(COLUMNS)] + ["\t".join(c.replace("\t", " ") for c in row) for row in table_rows(rows, chosen)]
    atomic_write_text(out, "\n".join(lines) + "\n")


_SCRIPT = """<script>
function filterRows(q) {
  q = q.toLowerCase(); let n = 0;
  for (const tr of document.querySelectorAll('#slides tbody tr')) {
    const show = tr.textContent.toLowerCase().includes(q); tr.style.display = show ? '' : 'none'; n += show;
  }
  document.getElementById('count').textContent = n;
}
</script>"""


def write_html(rows: list[SlideRow], chosen: dict[str, str], out: str | Path) -> None:
    """The table as one HTML page with a search box (plain text match over each row)."""
    shown = COLUMNS[:-1]  # the full type vector stays in the TSV
    body = []
    for row in table_rows(rows, chosen):
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row[: len(shown)]) + "</tr>")
    n_failed = sum(r.status != "ok" for r in rows)
    n_flagged = sum(bool(r.flags) for r in rows)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Slides</title>"
        "<style>body{font-family:sans-serif;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd;"
        "text-align:left;white-space:nowrap}</style>" + _SCRIPT + "</head><body>"
        f"<p>{len(rows)} slides, {n_failed} failed or without tissue, {n_flagged} with QC flags, "
        f"{len(chosen)} shown as images in the report. Search: "
        "<input oninput='filterRows(this.value)' placeholder='slide, status, flag, reason, type'> "
        f"<span id='count'>{len(rows)}</span> rows</p>"
        "<table id='slides'><thead><tr>" + "".join(f"<th>{c}</th>" for c in shown) + "</tr></thead><tbody>"
        + "\n".join(body) + "</tbody></table></body></html>"
    )
    atomic_write_text(out, page)


def write_selected_images(rows: list[SlideRow], chosen: dict[str, str], out_dir: str | Path, max_px: int) -> int:
    """Downscaled copies (longest side ``max_px``) of the chosen slides' map PNGs, or of the
    tissue-mask overlay for a slide without a map, as ``<out_dir>/<slide>.png``. The folder
    is replaced as a whole: it holds the current selection only."""
    import shutil

    from PIL import Image

    final = Path(out_dir)
    out_dir = final.with_name(final.name + ".tmp")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    by_id = {r.slide_id: r for r in rows}
    written = 0
    for sid in chosen:
        r = by_id[sid]
        src = next((p for p in (r.map_png, r.qc_png) if Path(p).is_file()), None)
        if src is None:
            continue  # an unreadable slide has no image; its row says why
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        atomic_write_bytes(out_dir / f"{sid}.png", buf.getvalue())
        written += 1
    shutil.rmtree(final, ignore_errors=True)
    out_dir.rename(final)
    return written
