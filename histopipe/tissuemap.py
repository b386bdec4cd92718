"""Per-slide tissue-type maps (contract #3) and their views: PNG overlay and QuPath GeoJSON.

A map is a raster at tile resolution anchored at the slide origin: cell (i, j) covers
level-0 x in [j * cell, (j + 1) * cell) and y likewise, where ``cell`` is the tile grid's
stride in level-0 px. Value 0 is background (no tile), t + 1 is tissue type t. The array
``map`` is uint16 (L, H, W), finest level first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
import zarr
from shapely.geometry import box, mapping

from histopipe.atomic import atomic_path, atomic_write_text
from histopipe.clustering import ClusterModel
from histopipe.errors import HistopipeError
from histopipe.palette import palette
from histopipe.sampling import store_info
from histopipe.slides import open_slide
from histopipe.tiling import TileStore


@dataclass(frozen=True)
class TileGrid:
    """The raster geometry of a slide's tile store (contract #1)."""

    slide_id: str
    slide_path: str
    backend: str
    cell_level0: float
    level0_width: int
    level0_height: int
    coords: np.ndarray = field(repr=False)  # (N, 2) int64 level-0 (x, y)
    attrs: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_tile_store(cls, path: str | Path) -> TileGrid:
        """The grid of a tile store. A store of a failed slide (no geometry) gives a 0 × 0
        raster, so that downstream outputs still exist for it."""
        store = TileStore(path)
        attrs = store.attrs
        slide_id = str(attrs.get("slide_id", Path(path).name.removesuffix(".zarr")))
        try:
            cell = float(attrs["stride_level0"])
            width, height = int(attrs["level0_width"]), int(attrs["level0_height"])
        except KeyError as err:
            if attrs.get("status") == "failed" and len(store.coords) == 0:
                cell, width, height = 1.0, 0, 0
            else:
                raise HistopipeError(f"{path}: tile store lacks attribute {err} (see contract #1)") from None
        if cell <= 0:
            raise HistopipeError(f"{path}: stride_level0 must be positive, got {cell}")
        coords = np.asarray(store.coords, dtype=np.int64).reshape(-1, 2)
        return cls(slide_id, str(attrs.get("slide_path", "")), str(attrs.get("backend", "auto")), cell, width, height, coords, attrs)

    @property
    def shape(self) -> tuple[int, int]:
        """Raster ``(H, W)`` in cells; the last row/column may reach past the slide edge."""
        return math.ceil(self.level0_height / self.cell_level0), math.ceil(self.level0_width / self.cell_level0)

    def cells(self, coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raster ``(rows, cols)`` (int64) of tiles with level-0 top-left ``coords`` (N, 2)."""
        coords = self.coords if coords is None else np.asarray(coords).reshape(-1, 2)
        h, w = self.shape
        if h == 0 or w == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        cols = np.clip(np.rint(coords[:, 0] / self.cell_level0).astype(np.int64), 0, w - 1)
        rows = np.clip(np.rint(coords[:, 1] / self.cell_level0).astype(np.int64), 0, h - 1)
        return rows, cols

    def tissue_mask(self) -> np.ndarray:
        """bool (H, W): cells that hold a tile (the tiler's tissue detection at cell level)."""
        mask = np.zeros(self.shape, dtype=bool)
        rows, cols = self.cells()
        mask[rows, cols] = True
        return mask


@dataclass
class TissueMap:
    """A map raster with its contract #3 attributes."""

    labels: np.ndarray  # (L, H, W) uint16
    attrs: dict[str, Any]

    @property
    def cell_level0(self) -> float:
        return float(self.attrs["cell_level0"])

    def tile_labels(self, grid: TileGrid) -> np.ndarray:
        """Label (0 = background, t + 1 = type t) of every tile of ``grid``: int64 (N, L)."""
        rows, cols = grid.cells()
        return self.labels[:, rows, cols].T.astype(np.int64)


def rasterize_tiles(grid: TileGrid, tile_types: np.ndarray) -> np.ndarray:
    """Map raster uint16 (L, H, W) from per-tile types ``tile_types`` int (N, L) (0-based)."""
    tile_types = np.asarray(tile_types)
    if tile_types.ndim == 1:
        tile_types = tile_types[:, None]
    if len(tile_types) != len(grid.coords):
        raise HistopipeError(f"{len(tile_types)} tile types for a grid of {len(grid.coords)} tiles")
    out = np.zeros((tile_types.shape[1], *grid.shape), dtype=np.uint16)
    rows, cols = grid.cells()
    out[:, rows, cols] = (tile_types + 1).T
    return out


def write_map(path: str | Path, tmap: TissueMap) -> None:
    """Write a map store (contract #3) atomically."""
    labels = np.ascontiguousarray(tmap.labels, dtype=np.uint16)
    if labels.ndim != 3:
        raise HistopipeError(f"{path}: map must be (L, H, W), got {labels.shape}")
    chunks = (1, max(1, min(labels.shape[1], 1024)), max(1, min(labels.shape[2], 1024)))
    with atomic_path(path) as tmp:
        group = zarr.open_group(tmp, mode="w")
        group.create_array("map", data=labels, chunks=chunks)
        group.attrs.update(_jsonable(tmap.attrs))


def read_map(path: str | Path) -> TissueMap:
    try:
        group = zarr.open_group(Path(path), mode="r")
        return TissueMap(np.asarray(group["map"][:]), dict(group.attrs))
    except Exception as err:
        raise HistopipeError(f"{path}: not a readable tissue map store: {err}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def kmeans_map(model: ClusterModel, embedding_store: str | Path, tile_store: str | Path, model_path: str | Path | None = None) -> TissueMap:
    """Assign every tile of a slide to the model's tissue types and rasterise the result."""
    grid = TileGrid.from_tile_store(tile_store)
    info = store_info(embedding_store)
    model.check_store(info)
    emb_coords = np.asarray(zarr.open_group(Path(embedding_store), mode="r")["coords"][:]).reshape(-1, 2)
    if not np.array_equal(emb_coords, grid.coords):
        raise HistopipeError(f"{embedding_store}: coords differ from the tile store {tile_store} ({len(emb_coords)} vs {len(grid.coords)} tiles)")
    labels = rasterize_tiles(grid, model.assign_store(embedding_store))
    attrs = {
        "levels": model.levels,
        "cell_level0": grid.cell_level0,
        "slide_id": grid.slide_id,
        "slide_path": grid.slide_path,
        "backend": grid.backend,
        "source": "kmeans",
        "num_labels": model.k + 1,
        "label_names": model.label_names(),
        "level_luts": model.label_luts(),
        "level0_width": grid.level0_width,
        "level0_height": grid.level0_height,
        "tiling": grid.attrs.get("tiling"),
        "encoder": model.meta.get("encoder"),
        "cluster_model": str(model_path) if model_path is not None else None,
        "cluster_model_id": model.model_id,
        "n_tiles": len(grid.coords),
    }
    return TissueMap(labels, attrs)


# --- views -------------------------------------------------------------------------------


def slide_thumbnail(slide_path: str | Path, max_side: int = 1024, backend: str = "auto", mpp: float | None = None) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the whole slide, longest side ``max_side`` px.

    Reads the pyramid level nearest above the needed resolution, in horizontal strips, so a
    slide without a small level never needs its full level in memory.
    """
    with open_slide(slide_path, backend=backend, mpp=mpp) as slide:
        w0, h0 = slide.dimensions
        scale = max_side / max(w0, h0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = slide.best_level_for_downsample(1.0 / scale)
        lw, lh = slide.level_dimensions[level]
        ds = slide.level_downsamples[level]
        strip = max(1, min(lh, (64 << 20) // (3 * lw)))  # ~64 MB of level pixels per read
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for y in range(0, lh, strip):
            h = min(strip, lh - y)
            part = slide.read_region((0, round(y * ds)), level, (lw, h))
            y0, y1 = round(y * th / lh), round((y + h) * th / lh)
            if y1 > y0:
                out[y0:y1] = cv2.resize(part, (tw, y1 - y0), interpolation=cv2.INTER_AREA)
        return out


def upsample_labels(labels2d: np.ndarray, cell_level0: float, level0_size: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
    """Nearest resample of a (H, W) map to an image of ``out_size`` = (w, h) covering the
    slide's level-0 extent ``level0_size`` = (w, h)."""
    (w0, h0), (tw, th) = level0_size, out_size
    cols = np.clip(((np.arange(tw) + 0.5) * w0 / tw / cell_level0).astype(np.int64), 0, labels2d.shape[1] - 1)
    rows = np.clip(((np.arange(th) + 0.5) * h0 / th / cell_level0).astype(np.int64), 0, labels2d.shape[0] - 1)
    return labels2d[rows[:, None], cols[None, :]]


def overlay_png(
    path: str | Path, tmap: TissueMap, slide_path: str | Path, level: int = 0, max_side: int = 1024,
    alpha: float = 0.5, backend: str = "auto", mpp: float | None = None,
) -> np.ndarray:
    """Write a PNG of the slide thumbnail with the map's ``level`` blended in; return it.

    A map without cells (a failed slide's) gives a blank placeholder without reading the slide.
    """
    if tmap.labels[level].size == 0:
        thumb = np.full((64, 64, 3), 255, dtype=np.uint8)
    else:
        thumb = slide_thumbnail(slide_path, max_side, backend, mpp)
    if tmap.labels[level].size == 0:
        labels = np.zeros(thumb.shape[:2], dtype=np.uint16)
    else:
        size0 = (int(tmap.attrs["level0_width"]), int(tmap.attrs["level0_height"]))
        labels = upsample_labels(tmap.labels[level], tmap.cell_level0, size0, (thumb.shape[1], thumb.shape[0]))
    colours = palette(max(int(labels.max()) + 1 if labels.size else 1, int(tmap.attrs.get("num_labels", 1))))
    out = thumb.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[labels[fg]]
    image = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise HistopipeError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
    return image


def label_polygons(labels2d: np.ndarray, label: int, cell_level0: float, level0_size: tuple[int, int]) -> shapely.Geometry:
    """Union of the cells holding ``label``, in level-0 px, clipped to the slide.

    Exact (cell edges, holes kept): row runs of equal cells become boxes whose coverage
    union is computed by shapely, far fewer boxes than cells.
    """
    mask = labels2d == label
    boxes = []
    for r in np.flatnonzero(mask.any(axis=1)):
        row = np.concatenate([[False], mask[r], [False]])
        edges = np.flatnonzero(row[1:] != row[:-1])
        for c0, c1 in zip(edges[::2], edges[1::2], strict=True):
            boxes.append(box(c0 * cell_level0, r * cell_level0, c1 * cell_level0, (r + 1) * cell_level0))
    if not boxes:
        return shapely.Polygon()
    union = shapely.coverage_union_all(boxes)
    return shapely.intersection(union, box(0, 0, *level0_size))


def map_geojson(tmap: TissueMap, level: int = 0) -> dict:
    """QuPath-compatible GeoJSON FeatureCollection: one annotation per label present at
    ``level``, a (Multi)Polygon in level-0 px, classified by label name and palette colour."""
    labels2d = tmap.labels[level]
    size0 = (int(tmap.attrs["level0_width"]), int(tmap.attrs["level0_height"]))
    names = _level_names(tmap, level)
    colours = palette(max(len(names), int(labels2d.max()) + 1 if labels2d.size else 1))
    features = []
    for label in np.unique(labels2d):
        if label == 0:
            continue
        geom = shapely.set_precision(label_polygons(labels2d, int(label), tmap.cell_level0, size0), 0.01)
        if geom.is_empty:
            continue
        name = names[label] if label < len(names) else f"label {label}"
        features.append({
            "type": "Feature",
            "id": f"{tmap.attrs.get('slide_id', 'slide')}-L{level}-{int(label)}",
            "geometry": mapping(geom),
            "properties": {
                "objectType": "annotation",
                "name": name,
                "classification": {"name": name, "color": [int(v) for v in colours[label]]},
                "label": int(label),
                "level": int(tmap.attrs["levels"][level]),
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _level_names(tmap: TissueMap, level: int) -> list[str]:
    if level == 0:
        return list(tmap.attrs.get("label_names", []))
    n = int(tmap.attrs["levels"][level])
    return ["background", *[f"k{n} type {t}" for t in range(n)]]


def write_geojson(path: str | Path, tmap: TissueMap, level: int = 0) -> dict:
    data = map_geojson(tmap, level)
    atomic_write_text(path, json.dumps(data) + "\n")
    return data
