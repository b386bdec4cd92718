"""Figures of the evaluation: real-vs-synthetic grids with their tissue maps, metric bar
charts and table renderings, as PNG files (PIL for pixel grids, matplotlib for charts).

Tissue types are always drawn in the same colours (``tissue_palette``): label 0, background,
is black; labels 1-20 take a fixed qualitative palette, higher labels golden-angle hues.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError
from histopipe.palette import palette


def tissue_palette(num_labels: int) -> np.ndarray:
    """The tissue maps' colours (histopipe.palette) with a black background, uint8 (num_labels, 3)."""
    return palette(num_labels, background=(0, 0, 0))


def colour_map(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB uint8 (H, W, 3); labels beyond the palette are white."""
    labels = np.asarray(labels, dtype=np.int64)
    full = np.concatenate([palette, np.full((1, 3), 255, np.uint8)])
    return full[np.clip(labels, 0, len(palette))]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px, broken after underscores and at spaces
    (a single part wider than that stays whole)."""
    parts = [p for p in re.split(r"(?<=_)|(?<= )", text) if p]
    lines: list[str] = []
    for part in parts:
        if lines and draw.textlength((lines[-1] + part).rstrip(), font=font) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return [ln.rstrip() for ln in lines] or [""]


def _tile(array: np.ndarray, side: int, nearest: bool) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(array))
    if img.size != (side, side):
        img = img.resize((side, side), Image.NEAREST if nearest else Image.BILINEAR)
    return img


def real_vs_synthetic_grid(
    real_images: np.ndarray,
    real_maps: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_maps: np.ndarray,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    tile: int = 192,
    title: str = "",
) -> Image.Image:
    """Rows of [real map | real image | synthetic map | synthetic image] and a legend of the
    tissue types shown. Images uint8 (B, S, S, 3), maps (B, S, S); both sets have B rows."""
    if len(real_images) != len(synthetic_images) or len(real_images) == 0:
        raise HistopipeError(
            f"grid needs the same non-zero number of real ({len(real_images)}) and synthetic "
            f"({len(synthetic_images)}) samples"
        )
    palette = tissue_palette(num_labels)
    gap, top = 4, 26 + (22 if title else 0)
    font, small = _font(16), _font(12)
    present, counts = np.unique(np.concatenate([np.ravel(real_maps), np.ravel(synthetic_maps)]),
                                return_counts=True)
    legend = [int(v) for v in present[np.argsort(-counts)]][:24]
    legend_rows = (len(legend) + 3) // 4
    width = 4 * tile + 5 * gap
    height = top + len(real_images) * (tile + gap) + gap + legend_rows * 18 + 6
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 4), title, fill="black", font=font)
    for col, name in enumerate(("real map", "real", "synthetic map", "synthetic")):
        draw.text((gap + col * (tile + gap), top - 22), name, fill="black", font=font)
    for r in range(len(real_images)):
        y = top + r * (tile + gap)
        panels = (
            _tile(colour_map(real_maps[r], palette), tile, True),
            _tile(real_images[r], tile, False),
            _tile(colour_map(synthetic_maps[r], palette), tile, True),
            _tile(synthetic_images[r], tile, False),
        )
        for col, panel in enumerate(panels):
            canvas.paste(panel, (gap + col * (tile + gap), y))
    y0 = top + len(real_images) * (tile + gap) + gap
    col_w = width // 4
    for i, label in enumerate(legend):
        x, y = gap + (i % 4) * col_w, y0 + (i // 4) * 18
        colour = tuple(int(c) for c in colour_map(np.array([label]), palette)[0])
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=colour, outline="black")
        name = label_names[label] if label_names and label < len(label_names) else str(label)
        draw.text((x + 16, y + 1), f"{label}: {name}"[:28], fill="black", font=small)
    return canvas


def save_png(image: Image.Image, out: str | Path) -> None:
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        image.save(fh, format="PNG", optimize=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, out: str | Path) -> None:
    plt = _pyplot()
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def metric_panels(table, metric: str, out: str | Path) -> None:
    """One bar panel per column of ``table`` (an AblationTable) whose key is ``metric`` or
    starts with ``metric:`` (e.g. ``fd`` -> one panel per encoder), bars = variants."""
    from histopipe.evaluation.ablation import header

    columns = [c for c in table.columns if c == metric or c.startswith(metric + ":")]
    if not columns:
        raise HistopipeError(f"the table has no {metric!r} column (has {table.columns})")
    plt = _pyplot()
    # Rows without this metric (the `real` row of an FD chart) get no empty slot.
    rows = [r for r in table.rows if any(isinstance(r.get(c), (int, float)) for c in columns)]
    variants = [row["variant"] for row in rows]
    fig, axes = plt.subplots(1, len(columns), figsize=(0.6 + 0.55 * len(variants) * len(columns)
                                                       + 1.2 * len(columns), 3.2), squeeze=False)
    # A variant keeps its colour in every chart of one table.
    colours = [tuple(c / 255 for c in palette(21)[1 + table.rows.index(r) % 20]) for r in rows]
    for ax, column in zip(axes[0], columns, strict=True):
        values = [row.get(column) for row in rows]
        heights = [v if isinstance(v, (int, float)) else 0.0 for v in values]
        bars = ax.bar(range(len(variants)), heights, color=colours)
        for bar, v in zip(bars, values, strict=True):
            text = "–" if not isinstance(v, (int, float)) else (f"{v:.1f}" if metric == "fd" else f"{v:.2f}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(header(column), fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    _save_figure(fig, out)


def table_png(table, out: str | Path) -> None:
    """The table (an AblationTable) rendered as an image, for reports that show PNGs only."""
    from histopipe.evaluation.ablation import _cell, header

    plt = _pyplot()
    cells = [[_cell(c, row.get(c)) for c in table.columns] for row in table.rows]
    fig, ax = plt.subplots(figsize=(1.1 + 1.0 * len(table.columns), 0.6 + 0.3 * len(cells)))
    ax.axis("off")
    tab = ax.table(cellText=cells or [[""] * len(table.columns)],
                   colLabels=[header(c) for c in table.columns], loc="center", cellLoc="right")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(table.columns))))
    _save_figure(fig, out)


def grid_from_stores(real, synthetic, n: int, seed: int = 0) -> Image.Image:
    """Real-vs-synthetic grid of n seeded random synthetic samples (``ImageSet``s).

    When the synthetic store has ``source_index`` (int (N,): the row of the patch store whose
    map conditioned each sample), each synthetic sample sits beside its own real patch;
    otherwise beside a random real patch of ``real``.
    """
    from histopipe.evaluation.features import open_store

    syn = synthetic.subset(n, seed)
    syn_images, syn_maps = syn.read(syn.indices, maps=True)
    syn_group = open_store(synthetic.path)
    sources = np.asarray(syn_group["source_index"].oindex[syn.indices], dtype=np.int64) if "source_index" in syn_group else None
    if sources is not None and (sources >= 0).all():
        real_rows = sources
        how = "real = the patch whose map conditioned the sample"
    else:
        real_rows = real.subset(len(syn), seed + 1).indices[: len(syn)]
        how = f"real = random {real.split} patches"
    real_images, real_maps = real.read(real_rows, maps=True)
    real_group = open_store(real.path)
    num_labels = int(real_group.attrs.get("num_labels",
                                          int(max(real_maps.max(), syn_maps.max())) + 1))
    names = list(real_group.attrs.get("label_names", [])) or None
    variant = synthetic.attrs.get("variant", synthetic.path.stem)
    return real_vs_synthetic_grid(real_images, real_maps, syn_images, syn_maps, num_labels,
                                  names, title=f"{variant}: {how}")


def variants_grid(real, synthetic: Sequence, n: int, seed: int = 0, tile: int = 128) -> Image.Image:
    """The variants side by side on the same held-out maps: rows of [real patch | its map |
    the crops given | one sample per synthetic store]. ``real``: the patch store's ``ImageSet``;
    ``synthetic``: ``ImageSet``s of held-out synthesis (``source_index``, ``crop_canvas``),
    whose first sample of each of ``n`` seeded random maps common to all is shown."""
    from histopipe.evaluation.features import open_store

    groups = [open_store(s.path) for s in synthetic]
    for s, g in zip(synthetic, groups, strict=True):
        if "source_index" not in g:
            raise HistopipeError(f"{s.path}: no `source_index` (not a held-out synthetic store)")
    firsts = []
    for g in groups:
        src = np.asarray(g["source_index"][:], dtype=np.int64)
        rows, first = np.unique(src, return_index=True)
        firsts.append(dict(zip(rows.tolist(), first.tolist(), strict=True)))
    common = sorted(set.intersection(*(set(f) for f in firsts)) - {-1})
    if not common:
        raise HistopipeError("the synthetic stores share no held-out map")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(common, size=min(n, len(common)), replace=False).tolist())
    real_images, real_maps = real.read(np.asarray(chosen), maps=True)
    real_group = open_store(real.path)
    palette = tissue_palette(int(real_group.attrs.get("num_labels", int(real_maps.max()) + 1)))
    names = ["real", "its map", "crops given"] + [str(s.attrs.get("variant", s.path.stem)) for s in synthetic]
    gap, font = 4, _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [_wrap(measure, name, font, tile) for name in names]
    line = 17
    top = 8 + line * max(len(h) for h in headers)
    canvas = Image.new("RGB", (len(names) * (tile + gap) + gap, top + len(chosen) * (tile + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for col, lines in enumerate(headers):
        for k, text in enumerate(lines):
            draw.text((gap + col * (tile + gap), 4 + k * line), text, fill="black", font=font)
    crops_group = next((g for g in groups if "crop_canvas" in g), None)
    for r, row in enumerate(chosen):
        panels = [_tile(real_images[r], tile, False), _tile(colour_map(real_maps[r], palette), tile, True)]
        if crops_group is not None:
            i = firsts[groups.index(crops_group)][row]
            panels.append(_tile(np.asarray(crops_group["crop_canvas"][i]), tile, True))
        else:
            panels.append(Image.new("RGB", (tile, tile), "white"))
        panels += [_tile(np.asarray(g["images"][f[row]]), tile, False) for g, f in zip(groups, firsts, strict=True)]
        for col, panel in enumerate(panels):
            canvas.paste(panel, (gap + col * (tile + gap), top + r * (tile + gap)))
    return canvas
