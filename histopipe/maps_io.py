"""Reading and writing tissue-type map stores (contract #3) as the patch stage needs them.

A map store holds ``map`` uint16 ``(L, H, W)``: a raster anchored at the slide origin where
cell ``(i, j)`` covers level-0 x in ``[j * cell_level0, (j + 1) * cell_level0)`` (y likewise);
0 is background, ``t + 1`` is tissue type ``t``; levels finest first. Attributes: ``levels``,
``cell_level0``, ``slide_id``, ``source`` ("kmeans" | "annotation"), ``num_labels`` (incl.
background), ``label_names``; optionally ``level_luts`` ``(L, num_labels)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError

SOURCES = ("kmeans", "annotation")


@dataclass
class MapStore:
    """A slide's map raster and its attributes."""

    path: Path
    map: np.ndarray  # (L, H, W) uint16
    attrs: dict[str, Any] = field(repr=False)

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def cell_level0(self) -> float:
        """Level-0 px per map cell."""
        return float(self.attrs["cell_level0"])

    @property
    def source(self) -> str:
        return str(self.attrs["source"])

    @property
    def num_labels(self) -> int:
        """Finest-level labels including background (label values are ``< num_labels``)."""
        return int(self.attrs["num_labels"])

    @property
    def levels(self) -> list[int]:
        return [int(v) for v in self.attrs["levels"]]

    @property
    def label_names(self) -> list[str]:
        names = self.attrs.get("label_names")
        if names:
            return [str(n) for n in names]
        return ["background", *(f"type_{t}" for t in range(self.num_labels - 1))]

    @property
    def level_luts(self) -> np.ndarray | None:
        """``(L, num_labels)`` int32 finest label → label at each level, when the store has it."""
        luts = self.attrs.get("level_luts")
        return None if luts is None else np.asarray(luts, dtype=np.int32)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays and tuples turned into JSON types (zarr attrs)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_map_store(path: str | Path, map_levels: np.ndarray, cell_level0: float, attrs: dict[str, Any]) -> Path:
    """Write a contract-#3 map store atomically.

    ``map_levels`` is ``(L, H, W)`` (or ``(H, W)`` for one level) of labels; ``attrs`` must
    give ``slide_id`` and ``source``; ``levels``, ``num_labels`` and ``label_names`` are
    derived from the raster when absent.
    """
    labels = np.asarray(map_levels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.size == 0:
        raise HistopipeError(f"{path}: map must be (L, H, W), got shape {labels.shape}")
    if labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max:
        raise HistopipeError(f"{path}: labels must fit uint16")
    labels = np.ascontiguousarray(labels, dtype=np.uint16)
    a = dict(attrs)
    for key in ("slide_id", "source"):
        if key not in a:
            raise HistopipeError(f"{path}: map attrs need {key!r}")
    if a["source"] not in SOURCES:
        raise HistopipeError(f"{path}: source must be one of {SOURCES}, got {a['source']!r}")
    a["cell_level0"] = float(cell_level0)
    a.setdefault("num_labels", int(labels[0].max()) + 1)
    a.setdefault("levels", [int(labels[i].max()) for i in range(len(labels))])
    a.setdefault("label_names", ["background", *(f"type_{t}" for t in range(int(a["num_labels"]) - 1))])
    chunks = (1, max(1, min(labels.shape[1], 1024)), max(1, min(labels.shape[2], 1024)))
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_array("map", data=labels, chunks=chunks)
        group.attrs.update(jsonable(a))
    return Path(path)


def read_map_store(path: str | Path) -> MapStore:
    """Open a map store and check it against contract #3 (raises HistopipeError naming it)."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        labels = np.asarray(group["map"][:])
        attrs = dict(group.attrs)
    except Exception as err:
        raise HistopipeError(f"{path}: not a readable map store: {err}") from None
    if labels.ndim != 3:
        raise HistopipeError(f"{path}: 'map' must be (L, H, W), got shape {labels.shape}")
    missing = [k for k in ("slide_id", "cell_level0", "source", "num_labels", "levels") if k not in attrs]
    if missing:
        raise HistopipeError(f"{path}: map store lacks attrs {missing} (contract #3)")
    store = MapStore(path, labels.astype(np.uint16, copy=False), attrs)
    if len(store.levels) != labels.shape[0]:
        raise HistopipeError(f"{path}: attrs levels has {len(store.levels)} entries but the map has {labels.shape[0]} levels")
    if store.cell_level0 <= 0:
        raise HistopipeError(f"{path}: cell_level0 must be > 0, got {store.cell_level0}")
    if labels.size and int(labels[0].max()) >= store.num_labels:
        raise HistopipeError(f"{path}: finest-level label {int(labels[0].max())} ≥ num_labels {store.num_labels}")
    luts = store.level_luts
    if luts is not None and luts.shape != (labels.shape[0], store.num_labels):
        raise HistopipeError(f"{path}: level_luts has shape {luts.shape}, expected {(labels.shape[0], store.num_labels)}")
    return store
