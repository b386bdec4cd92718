"""The crop bank: real visual crops per tissue type across the cohort, for synthesis time.

Store (zarr v3, contract #4): ``crops`` uint8 (M, B, B, 3) chunk (1, B, B, 3) resized to the
bank size B; ``labels`` uint16 (M,) finest tissue label (t + 1 = type t); ``side`` int32 (M,)
original side in dataset-image px; ``slide_id`` str (M,); ``patch_index`` int64 (M,) row in
the dataset store. Rows are in dataset order; attrs give ``size``, ``per_type``, ``splits``,
``label_names``, ``num_labels``, ``counts`` {label: crops}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr

from histopipe.atomic import atomic_path
from histopipe.dataset import SPLITS, open_dataset, read_strings
from histopipe.errors import ConfigError, HistopipeError
from histopipe.maps_io import jsonable
from histopipe.patches import CropBankConfig


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square crop to ``size`` px (area when shrinking, cubic when enlarging)."""
    if image.shape[0] == size:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def choose_crops(labels: np.ndarray, valid: np.ndarray, eligible_rows: np.ndarray, per_type: int, seed: int) -> np.ndarray:
    """``(n, c)`` slots for the bank: for every label, up to ``per_type`` valid crops drawn
    at random (seeded per label) from the eligible dataset rows; int64 (M, 2) sorted by row."""
    rows_ok = np.zeros(len(labels), dtype=bool)
    rows_ok[eligible_rows] = True
    ok = valid & rows_ok[:, None] & (labels > 0)
    chosen = []
    for value in np.unique(labels[ok]):
        slots = np.argwhere(ok & (labels == value))
        rng = np.random.default_rng([seed, int(value)])
        if len(slots) > per_type:
            slots = slots[np.sort(rng.choice(len(slots), per_type, replace=False))]
        chosen.append(slots)
    if not chosen:
        return np.zeros((0, 2), dtype=np.int64)
    slots = np.concatenate(chosen)
    return slots[np.lexsort((slots[:, 1], slots[:, 0]))].astype(np.int64)


def build_crop_bank(dataset: str | Path, out: str | Path, cfg: CropBankConfig, seed: int = 0) -> dict[str, Any]:
    """Write the crop bank of a dataset store from its valid crops in ``cfg.splits``."""
    bad = [s for s in cfg.splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"patches.crop_bank.splits: unknown split(s) {bad} (choose from {SPLITS})")
    root = open_dataset(dataset)
    attrs = dict(root.attrs)
    labels = np.asarray(root["crop_labels"][:])
    valid = np.asarray(root["crop_valid"][:])
    boxes = np.asarray(root["crop_boxes"][:])
    split = np.asarray(root["split"][:])
    slide_ids = read_strings(root["slide_id"])
    rows = np.flatnonzero(np.isin(split, [SPLITS.index(s) for s in cfg.splits]))
    slots = choose_crops(labels, valid, rows, cfg.per_type, seed)
    m, b = len(slots), cfg.size
    bank_labels = labels[slots[:, 0], slots[:, 1]].astype(np.uint16) if m else np.zeros(0, np.uint16)
    counts = {int(v): int(c) for v, c in zip(*np.unique(bank_labels, return_counts=True), strict=True)}
    with atomic_path(out) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        crops = g.create_array("crops", shape=(m, b, b, 3), dtype="uint8", chunks=(1, b, b, 3))
        image, current = None, -1
        for j, (n, c) in enumerate(slots):
            if n != current:  # slots are sorted by row: each image is read once
                image, current = np.asarray(root["images"][n]), n
            y0, x0, side = (int(v) for v in boxes[n, c])
            crops[j] = resize_square(image[y0 : y0 + side, x0 : x0 + side], b)
        chunk = max(1, min(m, 65536))
        g.create_array("labels", data=bank_labels, chunks=(chunk,))
        g.create_array("side", data=(boxes[slots[:, 0], slots[:, 1], 2] if m else np.zeros(0)).astype(np.int32), chunks=(chunk,))
        g.create_array("patch_index", data=slots[:, 0].astype(np.int64), chunks=(chunk,))
        sid = g.create_array("slide_id", shape=(m,), dtype=str, chunks=(chunk,))
        if m:
            sid[:] = slide_ids[slots[:, 0]]
        g.attrs.update(jsonable({
            "size": b, "per_type": cfg.per_type, "splits": list(cfg.splits), "seed": seed,
            "label_names": attrs.get("label_names"), "num_labels": attrs.get("num_labels"),
            "source": attrs.get("source"), "dataset": str(Path(dataset).resolve()),
            "mpp": attrs.get("mpp"), "counts": {str(k): v for k, v in counts.items()}, "n_crops": m,
        }))
    return {"n_crops": m, "counts": counts}


class CropBank:
    """Read access to a crop bank: ``sample(label, rng)`` gives one real crop of that type."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._root = zarr.open_group(str(self.path), mode="r")
            self.labels = np.asarray(self._root["labels"][:])
            self.attrs = dict(self._root.attrs)
        except Exception as err:
            raise HistopipeError(f"{path}: not a readable crop bank: {err}") from None
        self.size = int(self.attrs["size"])
        self._rows = {int(v): np.flatnonzero(self.labels == v) for v in np.unique(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def available(self) -> list[int]:
        """Labels (t + 1 = type t) with at least one crop."""
        return sorted(self._rows)

    def has(self, label: int) -> bool:
        return int(label) in self._rows

    def __getitem__(self, row: int) -> np.ndarray:
        return np.asarray(self._root["crops"][int(row)])

    def sample(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """A random crop of tissue ``label``: uint8 (B, B, 3). Raises HistopipeError when the
        bank has none of that label (check :meth:`has`)."""
        rows = self._rows.get(int(label))
        if rows is None:
            raise HistopipeError(f"{self.path}: no crops of label {label} (the bank has crops of {len(self._rows)} labels)")
        return self[int(rows[rng.integers(len(rows))])]
