"""Real labels as tissue maps (contract #3, ``source: annotation``) for annotated cohorts.

Two formats, chosen by the file's suffix:

- Camelyon16 / ASAP XML (``.xml``): polygons in level-0 px, grouped by ``PartOfGroup``.
  Groups ``_0``, ``_1``, ``Tumor`` (and Camelyon17's ``metastases``) are tumour; ``_2`` and
  ``Exclusion`` are non-tumour areas drawn inside tumour and are cut out of it. Map labels:
  0 background, 1 normal (a tile's cell not covered by tumour), 2 tumour (at least half of
  the cell's area inside tumour polygons, whether or not the tiler kept the cell).
- PANDA-style label masks (``.tif``/``.tiff``/``.png``): integer labels in the first
  channel at any downsample of the slide (the downsample is taken from the size ratio);
  each map cell takes the mask value at its centre (nearest). Label 0 stays background.

The raster is the tile store's grid (histopipe.tissuemap.TileGrid), so annotation maps and
k-means maps of one tiling line up cell for cell.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
import tifffile
from PIL import Image

from histopipe.errors import HistopipeError
from histopipe.tissuemap import TileGrid, TissueMap

log = logging.getLogger(__name__)

TUMOUR_GROUPS = frozenset({"_0", "_1", "tumor", "tumour", "metastases", "metastasis"})
EXCLUSION_GROUPS = frozenset({"_2", "exclusion", "normal", "non-tumor"})
CAMELYON_NAMES = ["background", "normal", "tumor"]
# Samples per cell side when rasterising polygons: the tumour decision uses the covered
# area fraction of a cell (64 samples), not a single point.
SUPERSAMPLE = 8

# PANDA label conventions (mask value -> name), selectable by name.
LABEL_PRESETS: dict[str, list[str]] = {
    "camelyon": CAMELYON_NAMES,
    "panda_radboud": ["background", "stroma", "healthy epithelium", "gleason 3", "gleason 4", "gleason 5"],
    "panda_karolinska": ["background", "benign tissue", "cancerous tissue"],
}


@dataclass(frozen=True)
class Polygon:
    """One ASAP annotation: its name, group and vertices (P, 2) float64 level-0 (x, y)."""

    name: str
    group: str
    kind: str
    points: np.ndarray


def read_asap_xml(path: str | Path) -> list[Polygon]:
    """Parse an ASAP/Camelyon16 annotation file (vertices sorted by their ``Order``)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise HistopipeError(f"{path}: not a readable ASAP XML annotation file: {err}") from None
    out = []
    for ann in root.iter("Annotation"):
        coords = []
        for c in ann.iter("Coordinate"):
            try:
                coords.append((float(c.get("Order", len(coords))),
                               float(c.get("X", "").replace(",", ".")), float(c.get("Y", "").replace(",", "."))))
            except ValueError:
                raise HistopipeError(f"{path}: annotation {ann.get('Name')!r}: bad coordinate {c.attrib}") from None
        coords.sort(key=lambda t: t[0])
        points = np.array([(x, y) for _, x, y in coords], dtype=np.float64).reshape(-1, 2)
        out.append(Polygon(ann.get("Name", ""), ann.get("PartOfGroup", ""), ann.get("Type", "Polygon"), points))
    return out


def _group_kind(group: str, path: Path) -> str:
    g = group.strip().lower()
    if g in TUMOUR_GROUPS:
        return "tumour"
    if g in EXCLUSION_GROUPS:
        return "exclusion"
    raise HistopipeError(
        f"{path}: unknown annotation group {group!r} (tumour groups: {sorted(TUMOUR_GROUPS)}, "
        f"exclusion groups: {sorted(EXCLUSION_GROUPS)})"
    )


def rasterize_polygons(polygons: list[np.ndarray], holes: list[np.ndarray], grid: TileGrid) -> np.ndarray:
    """float32 (H, W): fraction of each map cell inside ``polygons`` minus ``holes``.

    Estimated from SUPERSAMPLE² sample points per cell. OpenCV fills the samples on a
    polygon's boundary too, which on average grows a shape by half a sample per edge;
    every polygon is shrunk by that much first, so the fractions are unbiased. Rendered in
    strips of cell rows, so memory stays bounded on fine grids.
    """
    h, w = grid.shape
    out = np.zeros((h, w), dtype=np.float32)
    shift = 8  # fixed-point bits: vertices keep sub-sample precision
    scale = SUPERSAMPLE / grid.cell_level0
    # Sample centres sit at +0.5; OpenCV samples at integer positions, hence the offset.
    polys = [r * scale - 0.5 for p in polygons for r in _shrunk(p, 0.5 / scale)]
    cuts = [r * scale - 0.5 for p in holes for r in _shrunk(p, 0.5 / scale)]
    strip = max(1, (32 << 20) // max(1, w * SUPERSAMPLE * SUPERSAMPLE))
    for r0 in range(0, h, strip):
        rows = min(strip, h - r0)
        canvas = np.zeros((rows * SUPERSAMPLE, w * SUPERSAMPLE), dtype=np.uint8)
        origin = np.array([0.0, r0 * SUPERSAMPLE])
        for group, value in ((polys, 1), (cuts, 0)):
            if group:
                pts = [np.round((p - origin) * (1 << shift)).astype(np.int32) for p in group]
                cv2.fillPoly(canvas, pts, value, lineType=cv2.LINE_8, shift=shift)
        out[r0 : r0 + rows] = canvas.reshape(rows, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
    return out


def _shrunk(points: np.ndarray, distance: float) -> list[np.ndarray]:
    """Outer rings (P, 2) of a polygon eroded by ``distance`` (self-intersections repaired)."""
    if len(points) < 3:
        return []
    geom = shapely.make_valid(shapely.Polygon(points)).buffer(-distance, join_style="mitre")
    parts = geom.geoms if hasattr(geom, "geoms") else [geom]
    return [np.asarray(g.exterior.coords) for g in parts if g.geom_type == "Polygon" and not g.is_empty]


def camelyon_map(xml_path: str | Path, grid: TileGrid) -> np.ndarray:
    """uint16 (1, H, W) map: 0 background, 1 normal tissue, 2 tumour (see module doc)."""
    xml_path = Path(xml_path)
    tumour, holes = [], []
    for poly in read_asap_xml(xml_path):
        if poly.kind.lower() in ("dot", "pointset", "point"):
            log.warning("%s: skipping point annotation %r (no area)", xml_path, poly.name)
            continue
        (tumour if _group_kind(poly.group, xml_path) == "tumour" else holes).append(poly.points)
    fraction = rasterize_polygons(tumour, holes, grid)
    labels = np.where(grid.tissue_mask(), 1, 0).astype(np.uint16)
    labels[fraction >= 0.5] = 2
    return labels[None]


def read_label_mask(path: str | Path, min_shape: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Integer labels (h, w) from a mask image's first channel. For a pyramidal TIFF, the
    coarsest level at least ``min_shape`` = (h, w) is read, never the full resolution when
    a smaller level suffices."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tf:
                chosen = _pick_level(tf, min_shape)
                arr = chosen.asarray()
                axes = chosen.axes
            if "S" in axes and axes.index("S") < axes.index("Y"):
                arr = np.moveaxis(arr, axes.index("S"), -1)  # planar -> channels last
        else:
            with Image.open(path) as im:
                arr = np.asarray(im)
    except HistopipeError:
        raise
    except Exception as err:
        raise HistopipeError(f"{path}: cannot read label mask: {err}") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise HistopipeError(f"{path}: label mask must hold integer labels in its first channel, got {arr.dtype} {arr.shape}")
    return arr


def _yx(level) -> tuple[int, int]:
    axes = level.axes
    return int(level.shape[axes.index("Y")]), int(level.shape[axes.index("X")])


def _pick_level(tf: tifffile.TiffFile, min_shape: tuple[int, int]):
    """The coarsest pyramid level of the first image that is at least ``min_shape``.

    Levels are gathered from every series (tifffile does not always group reduced pages
    into one pyramid) and kept when they have the first image's aspect ratio, which leaves
    out label and macro images."""
    levels = [lvl for series in tf.series for lvl in series.levels if "Y" in lvl.axes and "X" in lvl.axes]
    if not levels:
        raise HistopipeError(f"{tf.filehandle.path}: no image in the TIFF")
    h0, w0 = _yx(levels[0])
    same = [lvl for lvl in levels if abs(_yx(lvl)[1] / _yx(lvl)[0] - w0 / h0) <= 0.02 * w0 / h0]
    same.sort(key=lambda lvl: _yx(lvl)[0] * _yx(lvl)[1])
    return next((lvl for lvl in same if _yx(lvl)[0] >= min_shape[0] and _yx(lvl)[1] >= min_shape[1]), same[-1])


def mask_map(mask_path: str | Path, grid: TileGrid, tolerance: float = 0.02) -> np.ndarray:
    """uint16 (1, H, W) map: the mask's label at each cell centre (nearest resampling)."""
    h, w = grid.shape
    mask = read_label_mask(mask_path, (h, w))
    mh, mw = mask.shape
    sx, sy = mw / grid.level0_width, mh / grid.level0_height
    if abs(sx - sy) > tolerance * max(sx, sy):
        raise HistopipeError(
            f"{mask_path}: mask {mw}x{mh} px does not have the slide's aspect ratio "
            f"({grid.level0_width}x{grid.level0_height} level-0 px)"
        )
    if int(mask.max()) > np.iinfo(np.uint16).max or int(mask.min()) < 0:
        raise HistopipeError(f"{mask_path}: labels must be in 0..65535")
    centres = (np.arange(max(h, w)) + 0.5) * grid.cell_level0
    cols = np.clip((centres[:w] * sx).astype(np.int64), 0, mw - 1)
    rows = np.clip((centres[:h] * sy).astype(np.int64), 0, mh - 1)
    return mask[rows[:, None], cols[None, :]].astype(np.uint16)[None]


def annotation_map(annotation: str | Path, tile_store: str | Path, label_names: list[str] | None = None) -> TissueMap:
    """A contract #3 map from an annotation file on the tile store's grid.

    ``label_names`` (index = label value) defaults to background/normal/tumor for XML and to
    ``label <v>`` names for masks.
    """
    annotation = Path(annotation)
    grid = TileGrid.from_tile_store(tile_store)
    suffix = annotation.suffix.lower()
    if suffix == ".xml":
        labels = camelyon_map(annotation, grid)
        names = list(label_names or CAMELYON_NAMES)
    elif suffix in (".tif", ".tiff", ".png"):
        labels = mask_map(annotation, grid)
        names = list(label_names or [])
    else:
        raise HistopipeError(f"{annotation}: unsupported annotation format {suffix!r} (ASAP .xml, or a label mask .tif/.tiff/.png)")
    num_labels = max(len(names), int(labels.max()) + 1, 2)
    names = (names or ["background"]) + [f"label {v}" for v in range(len(names) or 1, num_labels)]
    attrs = {
        "levels": [num_labels - 1],
        "cell_level0": grid.cell_level0,
        "slide_id": grid.slide_id,
        "slide_path": grid.slide_path,
        "backend": grid.backend,
        "source": "annotation",
        "num_labels": num_labels,
        "label_names": names,
        "level_luts": [list(range(num_labels))],
        "level0_width": grid.level0_width,
        "level0_height": grid.level0_height,
        "tiling": grid.attrs.get("tiling"),
        "annotation": str(annotation),
        "n_tiles": len(grid.coords),
    }
    return TissueMap(labels, attrs)
