"""Fast region reads from tiled TIFF pyramids: the file's own tiles, each decoded once.

OpenSlide and tiffslide pay about 1 ms of per-call overhead on every ``read_region`` (more
than decoding a 256² JPEG tile takes), and decode a file tile again for every grid tile that
overlaps it. :class:`TiffTiles` reads the tiles' bytes at the offsets the TIFF records
(``os.pread``) and decodes them with imagecodecs (libjpeg-turbo for JPEG, tifffile's decoders
for the other codecs). :meth:`TiffTiles.read_regions` streams many regions and decodes each
file tile once, dropping it after the last region that needs it.

Pixels are those of the backend the slide was opened with (``exact``): levels are the
backend's levels (matched by their dimensions), level-0 locations map to a level as the
backend maps them (tiffslide truncates ``x / downsample``; OpenSlide interpolates a
fractional ``x / downsample``, which :meth:`TiffTiles.exact_at` reports as not exact), and
pixels outside the level are the backend's fill (white for OpenSlide, black for tiffslide).
Support is decided by inspecting the file (TIFF structure, tiling, codec, vendor), never by
its extension; anything else raises :class:`FastReadUnsupported` so that callers use the
general :class:`~histopipe.slides.SlideReader` path.

Reduced-scale decoding: imagecodecs' ``jpeg8_decode`` exposes no DCT scaling, OpenCV's
``imdecode`` does (``IMREAD_REDUCED_COLOR_2/4/8``, libjpeg-turbo ``scale_denom``). It is
used only when asked for (``reduce > 1``): its pixels differ slightly from decoding at full
size and resizing with area interpolation (see tests/test_fastread.py for the bound).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import tifffile

from histopipe.errors import SlideError
from histopipe.slides import SlideReader

# Vendors whose tiles are the image as stored: no overlaps, offsets or corrections applied by
# the backend (OpenSlide corrects Ventana BIF overlaps, Leica SCN offsets, NDPI is not tiled).
_VENDORS = {"openslide": {"aperio", "generic-tiff"}, "tiffslide": {"aperio", "unknown"}}
# What the backend (through slides.to_rgb) returns outside the level or for missing tiles.
_FILL = {"openslide": 255, "tiffslide": 0}
_JPEG = 7
_RGB, _YCBCR = 2, 6
# libjpeg-turbo scaled decoding through OpenCV (scale_denom 2, 4, 8).
_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class FastReadUnsupported(Exception):
    """The file or level cannot be read by the fast path; the message says why."""


@dataclass
class Level:
    """One pyramid level as stored: tile grid, tile byte ranges and how to decode them."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_x: int
    tiles_y: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    compression: int
    jpegtables: bytes | None
    jpeg_colorspace: str | None
    photometric: int
    page: Any  # tifffile.TiffPage, for its generic decoder

    def tile_index(self, tx: int, ty: int) -> int:
        return ty * self.tiles_x + tx


class TiffTiles:
    """The pyramid levels of one tiled TIFF, read tile by tile (one object per process).

    ``level_dimensions``/``level_downsamples`` are the backend's; ``backend`` is
    ``openslide`` or ``tiffslide`` and fixes how locations map to levels and the fill value.
    """

    def __init__(self, path: str | Path, backend: str, level_dimensions: Sequence[tuple[int, int]], level_downsamples: Sequence[float]):
        self.path = Path(path)
        if backend not in _FILL:
            raise FastReadUnsupported(f"backend {backend!r} has no fast path")
        self.backend = backend
        self.fill = _FILL[backend]
        self.level_dimensions = [tuple(int(v) for v in d) for d in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as err:
            raise FastReadUnsupported(f"not a readable TIFF ({type(err).__name__}: {err})") from None
        try:
            if self._tif.is_ndpi:
                raise FastReadUnsupported("NDPI: its JPEG stripes are not stored as tiles")
            self._levels = _match_levels(self._tif, self.level_dimensions)
        except BaseException:
            self._tif.close()
            raise
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def for_reader(cls, reader: SlideReader) -> TiffTiles:
        """Fast tiles of the file ``reader`` has open, with its levels and mapping."""
        vendor = reader.vendor
        if vendor not in _VENDORS.get(reader.backend, ()):
            raise FastReadUnsupported(f"{reader.backend} vendor {vendor!r} is not read by the fast path")
        return cls(reader.path, reader.backend, reader.level_dimensions, reader.level_downsamples)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tif.close()

    def __enter__(self) -> TiffTiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def level(self, level: int) -> Level:
        """The stored level behind backend ``level``; raises FastReadUnsupported if none."""
        lv = self._levels[level]
        if isinstance(lv, str):
            raise FastReadUnsupported(f"level {level}: {lv}")
        return lv

    # --- where level-0 locations fall on a level -----------------------------------------
    def level_coords(self, locations: np.ndarray, level: int) -> np.ndarray:
        """Level-0 ``(x, y)`` (N, 2) → level pixel ``(x, y)`` int64, as the backend maps them.

        Where OpenSlide would sample between pixels (see :meth:`exact_at`) the nearest pixel
        is taken.
        """
        loc = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
        if level == 0:
            return loc.copy()
        lc = loc / self.level_downsamples[level]
        if self.backend == "tiffslide":
            return np.trunc(lc).astype(np.int64)  # tiffslide: int(x / downsample)
        return np.round(lc).astype(np.int64)

    def exact_at(self, locations: np.ndarray, level: int) -> bool:
        """Whether reads at these level-0 locations give the backend's pixels exactly.

        OpenSlide divides a location by the level's downsample and, when that is not a whole
        pixel, renders the level shifted by the fraction (bilinear, through cairo).
        """
        if level == 0 or self.backend == "tiffslide":
            return True
        lc = np.asarray(locations, dtype=np.int64).reshape(-1, 2) / self.level_downsamples[level]
        return bool(np.all(lc == np.floor(lc)))

    # --- decoding ------------------------------------------------------------------------
    def _tile_bytes(self, lv: Level, index: int) -> bytes | None:
        n = int(lv.bytecounts[index])
        if n == 0:
            return None
        data = os.pread(self._fd, n, int(lv.offsets[index]))
        if len(data) != n:
            raise SlideError(self.path, f"truncated file (tile {index} at byte {lv.offsets[index]} of the {lv.width}×{lv.height} level)")
        return data

    def decode_tile(self, lv: Level, tx: int, ty: int, reduce: int = 1, out: np.ndarray | None = None) -> np.ndarray | None:
        """File tile ``(tx, ty)`` as uint8 ``(h, w, 3)`` at 1/``reduce`` scale; None if not
        stored. Full-scale JPEG is decoded into ``out`` when given (reusing memory matters:
        a fresh 256² array costs page faults worth a quarter of the decoding)."""
        index = lv.tile_index(tx, ty)
        data = self._tile_bytes(lv, index)
        if data is None:
            return None
        try:
            if reduce > 1:
                return _decode_jpeg_reduced(data, lv, reduce)
            if lv.compression == _JPEG:
                return imagecodecs.jpeg8_decode(data, tables=lv.jpegtables, colorspace=lv.jpeg_colorspace, outcolorspace="RGB", out=out)
            tile, _, shape = lv.page.decode(data, index, jpegtables=lv.jpegtables)
            return np.asarray(tile).reshape(shape[1], shape[2], -1)[..., :3]
        except Exception as err:  # codecs raise many types for corrupt data
            raise SlideError(self.path, f"cannot decode tile ({tx}, {ty}) of the {lv.width}×{lv.height} level: {err}") from None

    # --- regions -------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Like ``SlideReader.read_region``: uint8 ``(h, w, 3)`` of ``size`` = (w, h) at ``level``."""
        return next(self.read_regions(np.asarray([location]), level, size))

    def read_regions(self, locations: np.ndarray, level: int, size: tuple[int, int], reduce: int = 1,
                     out: Iterable[np.ndarray] | None = None, max_cache_mb: float = 512.0) -> Iterator[np.ndarray]:
        """Yield the region of ``size`` = (w, h) level px at each level-0 location, in order.

        Each file tile is decoded once for the whole call (and dropped after the last region
        that needs it), however many regions overlap it; row-major locations keep at most
        about one row of file tiles alive. ``reduce`` (1, 2, 4 or 8; JPEG only) decodes at
        1/``reduce`` scale and yields regions of ``size / reduce`` px; the level locations
        and ``size`` must then be multiples of ``reduce``. ``out`` gives a destination array
        per region, taken in turn (views into a batch, or one buffer repeated when each region
        is used before the next is asked for); without it each region is a new array. Past
        ``max_cache_mb`` of decoded tiles the oldest are dropped (decoded again if needed).
        """
        lv = self.level(level)
        lc = self.level_coords(locations, level)
        w, h = int(size[0]), int(size[1])
        if reduce != 1:
            _check_reduce(lv, lc, w, h, reduce)
        k = reduce
        tw, th, nx = lv.tile_w // k, lv.tile_h // k, lv.tiles_x
        lw, lh = math.ceil(lv.width / k), math.ceil(lv.height / k)
        rw, rh = w // k, h // k
        lc = lc // k
        spans = _tile_spans(lc, rw, rh, tw, th, nx, lv.tiles_y)
        expire = _last_uses(spans, nx)
        dests = None if out is None else iter(out)
        cache: dict[int, np.ndarray | None] = {}
        spare: list[np.ndarray] = []  # memory of dropped tiles, decoded into again
        used = [0]  # bytes in cache
        limit = max_cache_mb * 2**20

        def cached(tx: int, ty: int) -> np.ndarray | None:
            key = ty * nx + tx
            if key not in cache:
                tile = cache[key] = self.decode_tile(lv, tx, ty, k, spare.pop() if spare else None)
                used[0] += 0 if tile is None else tile.nbytes
            return cache[key]

        def drop(key: int, recycle: bool = True) -> np.ndarray | None:
            tile = cache.pop(key, None)
            if tile is not None:
                used[0] -= tile.nbytes
                if recycle and k == 1 and tile.shape == (th, tw, 3):
                    spare.append(tile)
            return tile

        for i, ((x, y), (tx0, tx1, ty0, ty1)) in enumerate(zip(lc.tolist(), spans.tolist(), strict=True)):
            dest = None if dests is None else next(dests)
            inside = x >= 0 and y >= 0 and x + rw <= lw and y + rh <= lh
            region = None
            if inside and tx0 == tx1 and ty0 == ty1 and (x, y, rw, rh) == (tx0 * tw, ty0 * th, tw, th):
                # The region is one whole file tile.
                key = ty0 * nx + tx0
                if key not in cache and key in expire[i]:  # this region alone needs it
                    region = self.decode_tile(lv, tx0, ty0, k, dest if dest is not None else (spare.pop() if spare else None))
                else:
                    tile = cached(tx0, ty0)
                    if tile is not None and key in expire[i] and dest is None:
                        region = drop(key, recycle=False)  # handed over, not reused
                    elif tile is not None:
                        region = tile.copy() if dest is None else tile
                if region is not None and region.shape != (rh, rw, 3):
                    region = None
            if region is None:
                region = dest if dest is not None else np.empty((rh, rw, 3), dtype=np.uint8)
                if not inside:
                    region.fill(self.fill)
                for ty in range(ty0, ty1 + 1):
                    for tx in range(tx0, tx1 + 1):
                        _paste(region, x, y, cached(tx, ty), tx * tw, ty * th, tw, th, lw, lh, self.fill)
            elif dest is not None and region is not dest:
                dest[...] = region
                region = dest
            for key in expire[i]:
                drop(key)
            while used[0] > limit and cache:
                drop(next(iter(cache)))
            yield region

    def verify(self, reader: SlideReader, level: int) -> str | None:
        """Compare one file tile read both ways; None when identical, else the difference.

        The tile with the most bytes (the most detail) is read at ``level`` when a level-0
        location maps exactly onto its corner, else at level 0 (OpenSlide at a level whose
        downsample is not whole), whose decoding shares the codec and colour handling.
        """
        lv = self.level(level)
        ds = self.level_downsamples[level]
        index = int(np.argmax(lv.bytecounts))
        tx, ty = index % lv.tiles_x, index // lv.tiles_x
        x, y = math.ceil(tx * lv.tile_w * ds), math.ceil(ty * lv.tile_h * ds)
        loc = np.array([[x, y]])
        if not (self.exact_at(loc, level) and (self.level_coords(loc, level) == [[tx * lv.tile_w, ty * lv.tile_h]]).all()):
            return self.verify(reader, 0) if level else "no level-0 location reads the tile exactly"
        size = (min(lv.tile_w, lv.width - tx * lv.tile_w), min(lv.tile_h, lv.height - ty * lv.tile_h))
        ours = self.read_region((x, y), level, size)
        theirs = reader.read_region((x, y), level, size)
        if np.array_equal(ours, theirs):
            return None
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        return f"level {level} tile ({tx}, {ty}) differs from {self.backend} (max {diff.max()}, mean {diff.mean():.3f})"

    def reduce_for(self, locations: np.ndarray, level: int, read_size: int, tile_size: int) -> int:
        """Largest DCT scale (1, 2, 4, 8) for reading ``read_size`` px regions at ``level``
        that are resized to ``tile_size``: never below ``tile_size``, locations aligned."""
        lv = self.level(level)
        if lv.compression != _JPEG:
            return 1
        lc = self.level_coords(locations, level)
        for k in (8, 4, 2):
            if read_size // k >= tile_size:
                try:
                    _check_reduce(lv, lc, read_size, read_size, k)
                except ValueError:
                    continue
                return k
        return 1


def _paste(out: np.ndarray, x: int, y: int, tile: np.ndarray | None, x0: int, y0: int, tw: int, th: int,
           lw: int, lh: int, fill: int) -> None:
    """Copy the part of file tile ``tile`` (``tw × th``, top-left at level px ``x0, y0``)
    that lies inside the level into ``out`` (top-left at ``x, y``); a missing tile, or the
    part of a short one, is ``fill``."""
    rh, rw = out.shape[:2]
    ix0, iy0 = max(x, x0), max(y, y0)
    ix1, iy1 = min(x + rw, x0 + tw, lw), min(y + rh, y0 + th, lh)
    if ix1 <= ix0 or iy1 <= iy0:
        return
    dst = out[iy0 - y : iy1 - y, ix0 - x : ix1 - x]
    if tile is None:
        dst.fill(fill)
        return
    src = tile[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    if src.shape != dst.shape:
        dst.fill(fill)
        dst = dst[: src.shape[0], : src.shape[1]]
    dst[...] = src


def _tile_spans(lc: np.ndarray, rw: int, rh: int, tw: int, th: int, nx: int, ny: int) -> np.ndarray:
    """Inclusive file-tile ranges ``(tx0, tx1, ty0, ty1)`` (N, 4) each region overlaps
    (empty ranges, tx1 < tx0, for regions outside the level)."""
    x, y = lc[:, 0], lc[:, 1]
    tx0 = np.clip(np.floor_divide(x, tw), 0, None)
    ty0 = np.clip(np.floor_divide(y, th), 0, None)
    tx1 = np.minimum(np.floor_divide(x + rw - 1, tw), nx - 1)
    ty1 = np.minimum(np.floor_divide(y + rh - 1, th), ny - 1)
    return np.stack([tx0, tx1, ty0, ty1], axis=1).astype(np.int64)


def _last_uses(spans: np.ndarray, nx: int) -> list[list[int]]:
    """For each region, the file tiles (keys ``ty * nx + tx``) no later region needs."""
    last: dict[int, int] = {}
    for i, (tx0, tx1, ty0, ty1) in enumerate(spans.tolist()):
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                last[ty * nx + tx] = i
    expire: list[list[int]] = [[] for _ in range(len(spans))]
    for key, i in last.items():
        expire[i].append(key)
    return expire


def _check_reduce(lv: Level, lc: np.ndarray, w: int, h: int, k: int) -> None:
    if k not in _CV2_REDUCED:
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {k}")
    if lv.compression != _JPEG:
        raise ValueError("reduced-scale decoding needs JPEG tiles")
    if lv.tile_w % k or lv.tile_h % k or w % k or h % k or np.any(lc % k):
        raise ValueError(f"tile size, region size and locations must be multiples of {k}")


def _decode_jpeg_reduced(data: bytes, lv: Level, k: int) -> np.ndarray:
    """Decode a JPEG tile at 1/k scale with OpenCV (libjpeg-turbo DCT scaling).

    OpenCV takes a complete stream and no colour-space hint, so the JPEGTables are spliced
    in and an Adobe APP14 marker states RGB or YCbCr (Aperio's RGB tiles carry none, and
    libjpeg would otherwise assume YCbCr).
    """
    body = _strip_colour_markers(data[2:])
    tables = lv.jpegtables[2:-2] if lv.jpegtables else b""
    transform = 0 if lv.jpeg_colorspace == "RGB" else 1
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    stream = np.frombuffer(b"\xff\xd8" + adobe + tables + body, dtype=np.uint8)
    bgr = cv2.imdecode(stream, _CV2_REDUCED[k])
    if bgr is None:
        raise ValueError("OpenCV cannot decode the JPEG tile")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _strip_colour_markers(body: bytes) -> bytes:
    """Drop APP0 (JFIF) and APP14 (Adobe) segments before the first scan: the marker added in
    front decides the colour space."""
    out, i = [], 0
    while i + 4 <= len(body) and body[i] == 0xFF:
        marker = body[i + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        length = int.from_bytes(body[i + 2 : i + 4], "big")
        if marker not in (0xE0, 0xEE):
            out.append(body[i : i + 2 + length])
        i += 2 + length
    return b"".join(out) + body[i:]


def _candidate_pages(tif: tifffile.TiffFile) -> list[Any]:
    """Every page that could hold a pyramid level: series levels first (tifffile's reading
    of the pyramid, SubIFDs included), then all top-level pages."""
    seen, pages = set(), []
    for series in tif.series:
        for lvl in getattr(series, "levels", [series]):
            page = lvl.keyframe
            if isinstance(page, tifffile.TiffPage) and page.offset not in seen:
                seen.add(page.offset)
                pages.append(page)
    for page in tif.pages:
        if page.offset not in seen:
            seen.add(page.offset)
            pages.append(page)
    return pages


def _match_levels(tif: tifffile.TiffFile, level_dimensions: list[tuple[int, int]]) -> list[Level | str]:
    """For each backend level, the stored page with its dimensions, or why none can be used."""
    pages = _candidate_pages(tif)
    levels: list[Level | str] = []
    for w, h in level_dimensions:
        same = [p for p in pages if (int(p.imagewidth), int(p.imagelength)) == (w, h)]
        if not same:
            levels.append(f"no page of {w}×{h} px in the file")
            continue
        reasons = []
        for page in same:
            problem = _page_problem(page)
            if problem is None:
                levels.append(_level(page))
                break
            reasons.append(problem)
        else:
            levels.append("; ".join(reasons))
    if isinstance(levels[0], str):
        raise FastReadUnsupported(f"level 0: {levels[0]}")
    return levels


def _page_problem(page: Any) -> str | None:
    if not page.is_tiled:
        return "stored in strips, not tiles"
    if page.tiledepth > 1 or page.imagedepth > 1:
        return "volumetric tiles"
    if page.planarconfig != 1:
        return "separate colour planes"
    if page.bitspersample != 8 or page.samplesperpixel != 3:
        return f"{page.samplesperpixel} samples of {page.bitspersample} bits (8-bit RGB only)"
    if page.compression == _JPEG:
        if page.photometric not in (_RGB, _YCBCR):
            return f"JPEG with photometric {page.photometric}"
        return None
    if page.photometric != _RGB:
        return f"photometric {page.photometric} (RGB only for non-JPEG codecs)"
    try:
        page.decode  # noqa: B018  (tifffile raises here when it has no decoder)
    except (ValueError, NotImplementedError) as err:
        return f"codec {page.compression} cannot be decoded ({err})"
    return None


def _level(page: Any) -> Level:
    tw, th = int(page.tilewidth), int(page.tilelength)
    colorspace = None
    if page.compression == _JPEG and page.photometric == _RGB and not page.is_jfif:
        colorspace = "RGB"  # Aperio: RGB JPEG with no marker saying so
    return Level(
        width=int(page.imagewidth), height=int(page.imagelength), tile_w=tw, tile_h=th,
        tiles_x=math.ceil(page.imagewidth / tw), tiles_y=math.ceil(page.imagelength / th),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64), bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
        compression=int(page.compression), jpegtables=page.jpegtables if page.compression == _JPEG else None,
        jpeg_colorspace=colorspace, photometric=int(page.photometric), page=page,
    )
