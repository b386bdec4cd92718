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
import tifffile
from PIL import Image

from histopipe.errors import HistopipeError
from histopipe.tissuemap import TileGrid, TissueMap

log = logging.getLogger(__name__)

TUMOUR_GROUPS = frozenset({"_0", "_1", "tumor", "tumour", "metastases", "metastasis"})
EXCLUSION_GROUPS = frozenset({"_2", "exclusion", "normal", "non-tumor"})
CAMELYON_NAMES = ["background", "normal", "tumor"]
# Subsamples per cell side when rasterising polygons: the tumour decision uses the covered
# area fraction of a cell (16 samples), not a single point.
SUPERSAMPLE = 4

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
    """float32 (H, W): fraction of each map cell inside ``polygons`` minus ``holes``."""
    h, w = grid.shape
    canvas = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE), dtype=np.uint8)
    shift = 8  # fixed-point bits: vertices keep sub-sample precision
    scale = SUPERSAMPLE / grid.cell_level0 * (1 << shift)

    def fill(points: list[np.ndarray], value: int) -> None:
        # Sample centres sit at +0.5; OpenCV samples at integer positions, hence the offset.
        pts = [np.round((p - 0.5 * grid.cell_level0 / SUPERSAMPLE) * scale).astype(np.int32) for p in points if len(p) >= 3]
        if pts:
            cv2.fillPoly(canvas, pts, value, lineType=cv2.LINE_8, shift=shift)

    fill(polygons, 1)
    fill(holes, 0)
    return canvas.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


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
                candidates = list(tf.series[0].levels)
                if len(candidates) == 1 and len(tf.pages) > 1:
                    candidates = [p for p in tf.pages if getattr(p, "shape", None) and len(p.shape) >= 2]
                candidates.sort(key=lambda p: p.shape[0] * p.shape[1])
                chosen = next((p for p in candidates if p.shape[0] >= min_shape[0] and p.shape[1] >= min_shape[1]), candidates[-1])
                arr = chosen.asarray()
        else:
            with Image.open(path) as im:
                arr = np.asarray(im)
    except HistopipeError:
        raise
    except Exception as err:
        raise HistopipeError(f"{path}: cannot read label mask: {err}") from None
    if arr.ndim == 3:
        # Channels last (RGB) unless the first axis is the small one (planar TIFF).
        arr = arr[0] if arr.shape[0] <= 4 and arr.shape[-1] > 4 else arr[..., 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise HistopipeError(f"{path}: label mask must hold integer labels in its first channel, got {arr.dtype} {arr.shape}")
    return arr


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
