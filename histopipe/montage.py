"""Cohort montage: example tiles of every tissue type, one row per type, to see what each is.

Examples are spread over slides: slides are visited in a seeded random order, each type
takes one random tile from each slide that has it until it has ``per_type`` slides, and the
final row draws round-robin over those slides. Only as many maps are read as needed to
fill every row, so the montage of a cohort of thousands of slides stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError
from histopipe.tiling import TileSource
from histopipe.tissuemap import TileGrid, palette, read_map

LABEL_WIDTH = 180  # px of the text panel left of each row


def pick_examples(
    pairs: Sequence[tuple[str | Path, str | Path]], per_type: int, level: int = 0, seed: int = 0,
) -> tuple[dict[int, list[tuple[int, int]]], dict]:
    """Choose up to ``per_type`` tiles per label from ``(map, tile store)`` pairs.

    Returns ``{label: [(pair index, tile index), ...]}`` and the attrs of the first map.
    """
    rng = np.random.default_rng(seed)
    cands: dict[int, list[tuple[int, np.ndarray]]] = {}
    first_attrs: dict | None = None
    num_labels = None
    for p in rng.permutation(len(pairs)):
        map_path, tile_path = pairs[p]
        tmap = read_map(map_path)
        if first_attrs is None:
            first_attrs = tmap.attrs
            num_labels = int(tmap.attrs.get("num_labels", 0))
        if level >= tmap.labels.shape[0]:
            raise HistopipeError(f"{map_path}: has {tmap.labels.shape[0]} level(s), level {level} asked")
        grid = TileGrid.from_tile_store(tile_path)
        labels = tmap.tile_labels(grid)[:, level] if len(grid.coords) else np.zeros(0, dtype=np.int64)
        for lab in np.unique(labels[labels > 0]):
            slot = cands.setdefault(int(lab), [])
            if len(slot) < per_type:
                idx = np.flatnonzero(labels == lab)
                slot.append((int(p), rng.choice(idx, min(per_type, len(idx)), replace=False)))
        if num_labels and len(cands) >= num_labels - 1 and all(len(v) >= per_type for v in cands.values()):
            break
    chosen: dict[int, list[tuple[int, int]]] = {}
    for lab, slots in cands.items():
        picks: list[tuple[int, int]] = []
        for r in range(per_type):
            for p, tiles in slots:
                if r < len(tiles) and len(picks) < per_type:
                    picks.append((p, int(tiles[r])))
        chosen[lab] = picks
    return chosen, first_attrs or {}


def cohort_montage(
    path: str | Path, pairs: Sequence[tuple[str | Path, str | Path]], per_type: int = 8, thumb: int = 96,
    level: int = 0, seed: int = 0,
) -> np.ndarray:
    """Write a PNG with one row per label of ``level`` (label name, colour, example tiles
    from different slides) and return the image, uint8 (rows * thumb, width, 3)."""
    if not pairs:
        raise HistopipeError("cluster montage: no (map, tile store) pairs given")
    chosen, attrs = pick_examples(pairs, per_type, level, seed)
    if level == 0:
        names = list(attrs.get("label_names", []))
        num_labels = int(attrs.get("num_labels", max(chosen, default=0) + 1))
    else:
        num_labels = int(attrs["levels"][level]) + 1
        names = ["background", *[f"k{num_labels - 1} type {t}" for t in range(num_labels - 1)]]
    colours = palette(num_labels)
    tiles = _read_tiles(pairs, chosen, thumb)
    rows = []
    for lab in range(1, num_labels):
        row = np.full((thumb, LABEL_WIDTH + per_type * thumb, 3), 255, dtype=np.uint8)
        row[4:-4, 4:20] = colours[lab]
        name = names[lab] if lab < len(names) else f"label {lab}"
        cv2.putText(row, name, (26, thumb // 2 - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        n = len(chosen.get(lab, []))
        slides = len({p for p, _ in chosen.get(lab, [])})
        cv2.putText(row, f"{n} tiles, {slides} slides" if n else "no tiles", (26, thumb // 2 + 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.38, (80, 80, 80), 1, cv2.LINE_AA)
        for i, key in enumerate(chosen.get(lab, [])):
            row[:, LABEL_WIDTH + i * thumb : LABEL_WIDTH + (i + 1) * thumb] = tiles[key]
        rows.append(row)
    image = np.concatenate(rows, axis=0) if rows else np.full((thumb, LABEL_WIDTH, 3), 255, np.uint8)
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise HistopipeError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return image


def _read_tiles(pairs: Sequence[tuple[str | Path, str | Path]], chosen: dict[int, list[tuple[int, int]]], thumb: int) -> dict[tuple[int, int], np.ndarray]:
    by_slide: dict[int, list[int]] = {}
    for picks in chosen.values():
        for p, t in picks:
            by_slide.setdefault(p, []).append(t)
    out = {}
    for p, tiles in by_slide.items():
        source = TileSource(pairs[p][1])
        try:
            for t in sorted(set(tiles)):
                out[(p, t)] = cv2.resize(source[t], (thumb, thumb), interpolation=cv2.INTER_AREA)
        finally:
            source.close()
    return out
