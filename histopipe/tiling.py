"""Tile grids in physical units, the per-slide tile store and tile pixel access.

A grid is asked for in µm/px and px; the pyramid level to read from and the resize factor
are derived. Coordinates are level-0 ``(x, y)`` of each tile's top-left corner.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr

from histopipe import __version__
from histopipe.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from histopipe.errors import SlideError
from histopipe.paths import tiling_id
from histopipe.regions import integral_image
from histopipe.slide_qc import stain_stats, tile_sharpness
from histopipe.slides import SlideReader, open_slide
from histopipe.tissue import (
    TissueConfig,
    geojson_features,
    geojson_text,
    mask_to_polygons,
    overlay,
    read_thumbnail,
    tissue_mask,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingConfig:
    """Tile grid parameters (config section ``tiling``)."""

    mpp: float = 0.5
    tile_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.25
    mpp_tolerance: float = 0.05
    blur_mpp: float = 2.0
    min_sharpness: float = 500.0
    blur_action: str = "flag"

    def __post_init__(self) -> None:
        if self.mpp <= 0:
            raise ValueError(f"tiling.mpp must be > 0, got {self.mpp}")
        if self.blur_action not in ("flag", "drop"):
            raise ValueError(f"tiling.blur_action must be 'flag' or 'drop', got {self.blur_action!r}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"tiling.overlap must be in [0, tile_size), got {self.overlap}")

    @property
    def id(self) -> str:
        return tiling_id(self.mpp, self.tile_size, self.overlap)


@dataclass(frozen=True)
class GridPlan:
    """Where and how tiles are read.

    ``tile_size_level0``/``stride_level0`` are level-0 px; tiles are read at ``read_level``
    as ``read_size`` px squares and resized once to ``tile_size`` (no resize when equal).
    """

    tile_size: int
    tile_size_level0: float
    stride_level0: float
    read_level: int
    read_downsample: float
    read_size: int
    cols: int
    rows: int

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size


def plan_grid(dimensions: tuple[int, int], level_downsamples: tuple[float, ...], slide_mpp: float, cfg: TilingConfig, slide: str = "slide") -> GridPlan:
    """Derive the grid for a slide of level-0 ``dimensions`` (w, h) at ``slide_mpp``.

    Raises SlideError when the slide is coarser than the target resolution (beyond the
    tolerance): tiles would be upsampled and carry less detail than asked for.
    """
    scale = cfg.mpp / slide_mpp  # level-0 px per target px
    if scale < 1 - cfg.mpp_tolerance:
        raise SlideError(slide, f"slide resolution {slide_mpp:.4g} µm/px is coarser than the target {cfg.mpp:g} µm/px (tiles would be upsampled)")
    scale = max(scale, 1.0)  # within tolerance of the target: read natively
    tile_l0 = cfg.tile_size * scale
    stride_l0 = (cfg.tile_size - cfg.overlap) * scale
    w, h = dimensions
    cols = int(math.floor((w - tile_l0) / stride_l0)) + 1 if w >= tile_l0 else 0
    rows = int(math.floor((h - tile_l0) / stride_l0)) + 1 if h >= tile_l0 else 0
    level = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= scale * (1 + cfg.mpp_tolerance):
            level = i
    ds = level_downsamples[level]
    read_size = int(round(tile_l0 / ds))
    if abs(read_size - cfg.tile_size) <= cfg.tile_size * cfg.mpp_tolerance:
        read_size = cfg.tile_size  # the level matches the target: read without resizing
    return GridPlan(cfg.tile_size, tile_l0, stride_l0, level, float(ds), read_size, max(cols, 0), max(rows, 0))


def grid_coords(plan: GridPlan) -> np.ndarray:
    """All grid positions, level-0 ``(x, y)`` int64 ``(rows*cols, 2)``, row-major."""
    xs = np.round(np.arange(plan.cols) * plan.stride_level0).astype(np.int64)
    ys = np.round(np.arange(plan.rows) * plan.stride_level0).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, mask_scale: float, coords: np.ndarray, tile_l0: float) -> np.ndarray:
    """Fraction of each tile's area that the mask covers; ``mask_scale`` = level-0 px per mask px."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    ii = integral_image(mask)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / mask_scale).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / mask_scale).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + tile_l0) / mask_scale).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + tile_l0) / mask_scale).astype(np.int64), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return (inside / area).astype(np.float32)


def source_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"source_size": int(st.st_size), "source_mtime": float(st.st_mtime)}


@dataclass
class TilingResult:
    slide_id: str
    n_tiles: int
    n_grid: int
    plan: GridPlan | None
    status: str
    reason: str = ""
    seconds: float = 0.0


def tile_slide(
    slide_path: str | Path,
    out: str | Path,
    slide_id: str | None = None,
    tiling: TilingConfig | None = None,
    tissue: TissueConfig | None = None,
    backend: str = "auto",
    mpp: float | None = None,
    qc_dir: str | Path | None = None,
) -> TilingResult:
    """Detect tissue, lay the grid, keep tiles above ``min_tissue`` and write the tile store.

    Writes ``out`` (zarr v3, see README: tile store) atomically and, when ``qc_dir`` is set,
    ``<slide>.tissue.png`` (mask overlay), ``<slide>.grid.png`` (kept tiles) and
    ``<slide>.tissue.geojson`` (QuPath annotations, level-0 coordinates).
    """
    import time

    t0 = time.perf_counter()
    tiling = tiling or TilingConfig()
    tissue = tissue or TissueConfig()
    slide_path = Path(slide_path)
    slide_id = slide_id or slide_path.stem
    with open_slide(slide_path, backend, mpp) as reader:
        plan = plan_grid(reader.dimensions, reader.level_downsamples, reader.mpp, tiling, str(slide_path))
        tmask, thumb = tissue_mask(reader, tissue)
        coords = grid_coords(plan)
        frac = tissue_fractions(tmask.mask, tmask.scale, coords, plan.tile_size_level0)
        keep = frac >= tiling.min_tissue if tiling.min_tissue > 0 else frac >= 0
        qc = {"ink_area_mm2": round(tmask.ink_fraction * reader.dimensions[0] * reader.dimensions[1] * reader.mpp**2 / 1e6, 4),
              **stain_stats(thumb, tmask.mask)}
        sharp = np.zeros(0, np.float32)
        n_found = int(keep.sum())
        if tiling.blur_mpp > 0 and keep.any():
            sharp_view, sharp_scale = read_thumbnail(reader, max(tiling.blur_mpp, reader.mpp))
            sharp = tile_sharpness(sharp_view, sharp_scale, coords[keep], plan.tile_size_level0)
            blurry = sharp < tiling.min_sharpness
            qc.update(n_blurry=int(blurry.sum()), blur_mpp=tiling.blur_mpp, min_sharpness=tiling.min_sharpness,
                      blur_action=tiling.blur_action)
            if tiling.blur_action == "drop":
                idx = np.flatnonzero(keep)
                keep[idx[blurry]] = False
                sharp = sharp[~blurry]
        status = "ok" if keep.any() else "empty"
        reason = ""
        if not keep.any():
            if n_found:
                reason = f"all {n_found} tissue tiles blurry (sharpness below {tiling.min_sharpness:g}; blur_action drop)"
            elif qc["ink_area_mm2"] > 0:
                reason = f"no tissue detected besides {qc['ink_area_mm2']:g} mm² of pen ink"
            else:
                reason = "no tissue detected"
            log.warning("%s: %s; writing an empty tile store", slide_path, reason)
        attrs = _store_attrs(reader, slide_id, tiling, plan, int(keep.sum()), status, reason)
        attrs.update(tissue_threshold=tmask.threshold, tissue_area_fraction=tmask.fraction, tissue=asdict(tissue), **qc)
        write_tile_store(out, coords[keep], frac[keep], attrs, sharpness=sharp if tiling.blur_mpp > 0 else None)
        if qc_dir is not None:
            write_qc(Path(qc_dir), slide_id, thumb, tmask.mask, tmask.scale, coords[keep], plan.tile_size_level0)
    return TilingResult(slide_id, int(keep.sum()), len(coords), plan, status, reason, time.perf_counter() - t0)


def _store_attrs(reader: SlideReader, slide_id: str, cfg: TilingConfig, plan: GridPlan, n: int, status: str, reason: str) -> dict:
    return {
        "slide_id": slide_id,
        "slide_path": str(reader.path.resolve()),
        "backend": reader.backend,
        "vendor": reader.vendor,
        "slide_mpp": reader.mpp,
        "target_mpp": cfg.mpp,
        "tile_size": cfg.tile_size,
        "overlap": cfg.overlap,
        "min_tissue": cfg.min_tissue,
        "tile_size_level0": plan.tile_size_level0,
        "stride_level0": plan.stride_level0,
        "read_level": plan.read_level,
        "read_downsample": plan.read_downsample,
        "read_size": plan.read_size,
        "grid_cols": plan.cols,
        "grid_rows": plan.rows,
        "level0_width": reader.dimensions[0],
        "level0_height": reader.dimensions[1],
        "n_tiles": n,
        "status": status,
        "reason": reason,
        "tiling": cfg.id,
        "histopipe_version": __version__,
        **source_fingerprint(reader.path),
    }


def write_tile_store(out: str | Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict,
                     sharpness: np.ndarray | None = None) -> None:
    """Write a tile store atomically (a killed run leaves no store under ``out``).

    ``sharpness`` (optional, ``(N,)``): each tile's variance of the Laplacian (blur QC).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        n = len(coords)
        chunk = max(1, min(n, 65536))
        root.create_array("coords", data=coords, chunks=(chunk, 2))
        root.create_array("tissue_fraction", data=np.asarray(fractions, dtype=np.float32), chunks=(chunk,))
        if sharpness is not None:
            root.create_array("sharpness", data=np.asarray(sharpness, dtype=np.float32), chunks=(chunk,))
        root.attrs.update(_jsonable(attrs))


def write_failed_store(out: str | Path, slide_id: str, slide_path: str | Path, cfg: TilingConfig, reason: str) -> None:
    """An empty store marking a slide that was skipped (``on_error: skip``)."""
    attrs = {"slide_id": slide_id, "slide_path": str(slide_path), "tiling": cfg.id, "tile_size": cfg.tile_size,
             "target_mpp": cfg.mpp, "overlap": cfg.overlap, "n_tiles": 0, "status": "failed", "reason": reason,
             "histopipe_version": __version__}
    write_tile_store(out, np.zeros((0, 2), np.int64), np.zeros(0, np.float32), attrs)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, dict):
            v = _jsonable(v)
        out[k] = v
    return out


def write_qc(qc_dir: Path, slide_id: str, thumb: np.ndarray, mask: np.ndarray, scale: float, coords: np.ndarray, tile_l0: float) -> None:
    from PIL import Image

    qc_dir.mkdir(parents=True, exist_ok=True)
    polys = mask_to_polygons(mask, scale)
    feats = geojson_features(polys, "Tissue", (0, 160, 0), {"slide_id": slide_id})
    atomic_write_text(qc_dir / f"{slide_id}.tissue.geojson", geojson_text(feats))
    atomic_write_bytes(qc_dir / f"{slide_id}.tissue.png", _png(Image.fromarray(overlay(thumb, mask))))
    grid = thumb.copy()
    side = max(1, int(round(tile_l0 / scale)))
    for x, y in coords:
        px, py = int(x / scale), int(y / scale)
        cv2.rectangle(grid, (px, py), (px + side - 1, py + side - 1), (30, 60, 220), 1)
    atomic_write_bytes(qc_dir / f"{slide_id}.grid.png", _png(Image.fromarray(grid)))


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class TileStore:
    """Read access to a tile store: ``coords`` (N, 2) level-0, ``tissue_fraction``, ``attrs``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._root = zarr.open_group(str(self.path), mode="r")
            self.attrs: dict = dict(self._root.attrs)
            self.coords: np.ndarray = self._root["coords"][:]
        except Exception as err:
            raise SlideError(self.path, f"not a readable tile store: {err}") from None

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def tissue_fraction(self) -> np.ndarray:
        return self._root["tissue_fraction"][:]


class TileSource:
    """Tile pixels of a tile store, read straight from the slide by coordinates.

    ``source[i]`` is uint8 ``(tile_size, tile_size, 3)``; :meth:`iter_batches` and
    :meth:`read_batch` read many tiles at once. Picklable: the slide is opened lazily in each
    process, so one object serves many DataLoader workers (``__getitems__`` lets a DataLoader
    with ``batch_size`` fetch whole batches through the fast path).

    Two read paths. The fast path (``histopipe.fastread``) reads the file's own tiles of a
    tiled TIFF pyramid and decodes each once per call, however many grid tiles overlap it.
    The general path calls the backend's ``read_region`` per tile and serves every other
    file. ``read_path`` says which is used, ``fast_reason`` why the general one.

    With ``exact=True`` (default) both paths give identical pixels; the fast path is only
    used where it can (it is checked once per process on one file tile with ``verify``).
    ``exact=False`` lets the fast path also decode JPEG at reduced DCT scale when tiles are
    downsampled by 2 or more (about 20 % faster there; a mean absolute difference of about
    0.15 grey levels from the area resize) and read OpenSlide levels whose downsample is not
    whole at the nearest pixel, where OpenSlide interpolates a sub-pixel shift (about 2 grey
    levels on average; without it those stores take the general path).
    """

    def __init__(self, store: str | Path | TileStore, backend: str | None = None, slide_path: str | Path | None = None,
                 fast: bool = True, exact: bool = True, verify: bool = True):
        store = store if isinstance(store, TileStore) else TileStore(store)
        self.store_path = store.path
        self.attrs = store.attrs
        self.coords = store.coords
        self.slide_path = Path(slide_path or self.attrs["slide_path"])
        self.backend = backend or self.attrs.get("backend", "auto")
        self.fast, self.exact, self.verify = fast, exact, verify
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._reader: SlideReader | None = None
        self._tiles = None  # fastread.TiffTiles when the fast path is used
        self._reduce = 1
        self._fast_reason: str | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_pid", "_reader", "_tiles", "_reduce", "_fast_reason"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self.coords)

    def _forked(self) -> None:
        # A forked DataLoader worker inherits the parent's open slide: open its own instead.
        if self._pid != os.getpid():
            self._reset()

    @property
    def reader(self) -> SlideReader:
        self._forked()
        if self._reader is None:
            self._reader = open_slide(self.slide_path, self.backend, self.attrs.get("slide_mpp"))
        return self._reader

    @property
    def read_path(self) -> str:
        """``"fast"`` or ``"general"``: how this process reads the tiles."""
        self._choose_path()
        return "general" if self._tiles is None else "fast"

    @property
    def fast_reason(self) -> str:
        """Why the general path is used (empty when the fast path is)."""
        self._choose_path()
        return self._fast_reason or ""

    @property
    def decode_reduce(self) -> int:
        """JPEG tiles are decoded at 1/``decode_reduce`` scale (above 1 only with ``exact=False``)."""
        self._choose_path()
        return self._reduce

    def _choose_path(self) -> None:
        self._forked()
        if self._fast_reason is not None or self._tiles is not None:
            return
        if not self.fast:
            self._fast_reason = "fast=False"
            return
        if len(self) == 0:
            self._fast_reason = "empty tile store"
            return
        from histopipe.fastread import FastReadUnsupported, TiffTiles

        a = self.attrs
        level, size, ts = int(a["read_level"]), int(a["read_size"]), int(a["tile_size"])
        tiles = None
        try:
            tiles = TiffTiles.for_reader(self.reader)
            tiles.level(level)
            if not tiles.exact_at(self.coords, level):
                if self.exact:
                    raise FastReadUnsupported(
                        f"OpenSlide interpolates level {level} (downsample {self.reader.level_downsamples[level]:.6g}) "
                        "at these coordinates; exact=False reads the nearest pixels")
            problem = tiles.verify(self.reader, level) if self.verify else None
            if problem:
                raise FastReadUnsupported(problem)
            self._reduce = 1 if self.exact else tiles.reduce_for(self.coords, level, size, ts)
            self._tiles = tiles
        except FastReadUnsupported as err:
            if tiles is not None:
                tiles.close()
            self._fast_reason = str(err)
            log.info("%s: general read path (%s)", self.slide_path, err)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read_batch([i])[0]

    def __getitems__(self, indices) -> list[np.ndarray]:
        """A batch as a list of tiles (the hook torch's DataLoader calls with ``batch_size``)."""
        return list(self.read_batch(indices))

    def read_at(self, x: int, y: int) -> np.ndarray:
        """The tile whose top-left corner is at level-0 ``(x, y)``."""
        a = self.attrs
        size = int(a["read_size"])
        self._choose_path()
        reader = self.reader if self._tiles is None else self._tiles
        return self._finish(reader.read_region((x, y), int(a["read_level"]), (size, size)))

    def _finish(self, tile: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
        """Resize to the tile size (area), into ``dst`` when given."""
        ts = int(self.attrs["tile_size"])
        if tile.shape[:2] != (ts, ts):
            tile = cv2.resize(tile, (ts, ts), dst=dst, interpolation=cv2.INTER_AREA)
        if dst is not None and tile is not dst:
            dst[...] = tile
            return dst
        return tile

    def _read_into(self, indices: np.ndarray, slots) -> Iterator[np.ndarray]:
        """Write the tiles of ``indices`` into the arrays of ``slots`` in turn, yielding each.

        The fast path decodes each file tile once for the whole call and, when no resize is
        needed, decodes straight into the slots.
        """
        a = self.attrs
        level, size, ts = int(a["read_level"]), int(a["read_size"]), int(a["tile_size"])
        self._choose_path()
        coords = self.coords[indices]
        if self._tiles is None:
            for (x, y), slot in zip(coords.tolist(), slots, strict=True):
                yield self._finish(self.reader.read_region((x, y), level, (size, size)), slot)
            return
        side = size // self._reduce
        if side == ts:
            yield from self._tiles.read_regions(coords, level, (size, size), reduce=self._reduce, out=slots)
            return
        scratch = np.empty((side, side, 3), dtype=np.uint8)
        regions = self._tiles.read_regions(coords, level, (size, size), reduce=self._reduce, out=itertools.repeat(scratch))
        for region, slot in zip(regions, slots, strict=True):
            yield self._finish(region, slot)

    def iter_batches(self, indices=None, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices int64 (B,), tiles uint8 (B, tile_size, tile_size, 3))`` batches.

        ``indices`` defaults to all tiles; give them in store (row-major) order so that file
        tiles shared by neighbouring grid tiles are decoded once across batches.
        """
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64).ravel()
        if len(idx) == 0:
            return
        ts = int(self.attrs["tile_size"])
        filled: collections.deque = collections.deque()

        def slots():
            for start in range(0, len(idx), batch_size):
                part = idx[start : start + batch_size]
                batch = np.empty((len(part), ts, ts, 3), dtype=np.uint8)
                filled.append((part, batch))
                yield from batch

        tiles = self._read_into(idx, slots())
        for start in range(0, len(idx), batch_size):
            for _ in range(min(batch_size, len(idx) - start)):
                next(tiles)
            yield filled.popleft()

    def read_batch(self, indices) -> np.ndarray:
        """Tiles of ``indices`` as uint8 ``(B, tile_size, tile_size, 3)``."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if len(idx) == 0:
            ts = int(self.attrs.get("tile_size", 0))
            return np.zeros((0, ts, ts, 3), dtype=np.uint8)
        return next(self.iter_batches(idx, batch_size=len(idx)))[1]

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        if self._reader is not None:
            self._reader.close()
        self._reset()
