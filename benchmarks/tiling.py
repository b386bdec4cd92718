"""Tiling benchmark: seconds from slide to tile coordinates, and tiles/s reading tile pixels.

Slides: the real Aperio slide CMU-1-Small-Region (2220 × 2967 px, 0.499 µm/px) and a
generated Aperio-style pyramid of 40000 × 30000 px at 0.25 µm/px (RGB JPEG without chroma
subsampling as Aperio writes it, Q=70, 256² tiles, levels 1/4/16/64) tiled from the real
slide's pixels with mirrors; it is written once, tile by tile, and cached.

For each slide and tiling it measures (1) ``tile_slide`` (tissue detection + grid + store)
and (2) tiles/s reading tile pixels with 1 and 2 worker processes, each worker reading a
contiguous band of tiles:

- ``openslide loop``: the baseline, ``np.asarray(OpenSlide.read_region(...))`` per tile made
  RGB (``cv2.cvtColor``), plus the area resize to the tile size when the grid downsamples;
- ``general``: ``TileSource(fast=False)`` (SlideReader.read_region per tile);
- ``fast``: ``TileSource()`` (histopipe.fastread, pixels identical to the general path);
- ``fast, DCT``: ``TileSource(exact=False)``, JPEG decoded at reduced DCT scale when the grid
  downsamples by 2 (slightly different pixels).

All methods read the same tiles: on the large slide a fixed subset (evenly spaced runs of
consecutive tiles), on the small one all tiles, read several times over. The fast path is
also timed on all tiles of the large slide. Each time is the best of ``--repeats`` runs,
because other jobs share this machine. OpenCV uses one thread per process.

Run: ``python benchmarks/tiling.py`` (a few minutes; the first run also writes the large
slide, about 1 GB, under ``$HISTOPIPE_CACHE/bench``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopipe.atomic import atomic_path, atomic_write_text  # noqa: E402
from histopipe.demo import _read_full, cache_dir, fetch_cmu_slide  # noqa: E402
from histopipe.slides import open_slide  # noqa: E402
from histopipe.tilepool import bands, map_batches, start_pool  # noqa: E402
from histopipe.tiling import TileSource, TilingConfig, tile_slide  # noqa: E402

LARGE = (40000, 30000)
LARGE_MPP = 0.25
QUALITY = 70
TILE = 256
LEVELS = (1, 4, 16, 64)
METHODS = ("openslide loop", "general", "fast", "fast, DCT")


# --- the large slide --------------------------------------------------------------------
def _mirror_block(img: np.ndarray) -> np.ndarray:
    """Image and its mirrors, 2 × 2: tiling the plane with it leaves no seams."""
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def _level0_tiles(block: np.ndarray, width: int, height: int):
    ph, pw = block.shape[:2]
    for ty in range(math.ceil(height / TILE)):
        band = block[(ty * TILE + np.arange(TILE)) % ph]
        for tx in range(math.ceil(width / TILE)):
            yield band[:, (tx * TILE + np.arange(TILE)) % pw]


def _reduced_level(block: np.ndarray, width: int, height: int, factor: int) -> np.ndarray:
    """Level 0 downsampled by ``factor`` (area), computed band by band to bound memory."""
    ph, pw = block.shape[:2]
    cols = np.arange(width) % pw
    rows_per_band = factor * 256
    out = np.empty((height // factor, width // factor, 3), dtype=np.uint8)
    for y0 in range(0, out.shape[0] * factor, rows_per_band):
        n = min(rows_per_band, out.shape[0] * factor - y0)
        band = block[(y0 + np.arange(n)) % ph][:, cols]
        out[y0 // factor : (y0 + n) // factor] = cv2.resize(band, (width // factor, n // factor), interpolation=cv2.INTER_AREA)
    return out


def large_slide(folder: Path) -> Path:
    """The cached 40000 × 30000 Aperio-style pyramid (written on first use, ~1 min)."""
    w, h = LARGE
    path = folder / f"mirrored_cmu1_{w}x{h}_q{QUALITY}.svs"
    if path.is_file():
        return path
    print(f"writing {path} (once) ...", flush=True)
    block = _mirror_block(_read_full(fetch_cmu_slide()))
    jpeg = {"compression": "jpeg", "compressionargs": {"level": QUALITY, "outcolorspace": "RGB"}, "subsampling": (1, 1)}
    head = "Aperio Image Library v12.0.15\r\n"
    desc = f"{head}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={QUALITY}|AppMag = 40|MPP = {LARGE_MPP}"
    res = {"resolution": (1e4 / LARGE_MPP, 1e4 / LARGE_MPP), "resolutionunit": "CENTIMETER"}
    reduced = {4: _reduced_level(block, w, h, 4)}
    for f in LEVELS[2:]:
        prev = reduced[max(reduced)]
        reduced[f] = cv2.resize(prev, (w // f, h // f), interpolation=cv2.INTER_AREA)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(_level0_tiles(block, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                  description=desc, metadata=None, maxworkers=2, **jpeg, **res)
        thumb = cv2.resize(reduced[16], (768, round(768 * h / w)), interpolation=cv2.INTER_AREA)
        tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None, description=f"{head}thumbnail")
        for f in LEVELS[1:]:
            lvl = reduced[f]
            tif.write(lvl, tile=(TILE, TILE), photometric="rgb", metadata=None, maxworkers=2,
                      description=f"{head}{w}x{h} -> {lvl.shape[1]}x{lvl.shape[0]} JPEG/RGB Q={QUALITY}", **jpeg)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as s:
            if s.level_count != len(LEVELS):
                path.unlink()
                raise RuntimeError(f"{backend} sees {s.level_count} levels in {path}, expected {len(LEVELS)}")
    return path


# --- reading ----------------------------------------------------------------------------
def _checksum(indices: np.ndarray, tiles: np.ndarray) -> int:
    return int(tiles[:, ::64, ::64].sum())


def _openslide_loop(slide_path: str, coords: np.ndarray, level: int, read_size: int, tile_size: int) -> int:
    """The baseline: one OpenSlide read_region call per tile."""
    import openslide

    cv2.setNumThreads(1)
    total = 0
    with openslide.OpenSlide(slide_path) as slide:
        for x, y in coords.tolist():
            tile = cv2.cvtColor(np.asarray(slide.read_region((x, y), level, (read_size, read_size))), cv2.COLOR_RGBA2RGB)
            if read_size != tile_size:
                tile = cv2.resize(tile, (tile_size, tile_size), interpolation=cv2.INTER_AREA)
            total += int(tile[::64, ::64].sum())
    return total


def _read(method: str, store: Path, indices: np.ndarray, workers: int, pool, passes: int = 1) -> None:
    """Read the tiles ``indices`` of ``store`` ``passes`` times with ``method``."""
    for _ in range(passes):
        _read_once(method, store, indices, workers, pool)


def _read_once(method: str, store: Path, indices: np.ndarray, workers: int, pool) -> None:
    if method == "openslide loop":
        src = TileSource(store)
        a = src.attrs
        args = (str(src.slide_path), int(a["read_level"]), int(a["read_size"]), int(a["tile_size"]))
        if workers == 1:
            _openslide_loop(args[0], src.coords[indices], *args[1:])
        else:
            futures = [pool.submit(_openslide_loop, args[0], src.coords[indices[b.start : b.stop]], *args[1:]) for b in bands(len(indices), workers)]
            [f.result() for f in futures]
        return
    kwargs = {"general": {"fast": False}, "fast": {}, "fast, DCT": {"exact": False}}[method]
    src = TileSource(store, **kwargs)
    map_batches(src, _checksum, workers=workers, batch_size=64, indices=indices, executor=pool if workers > 1 else None)


def _time(repeats: int, fn, *args) -> float:
    """Best wall time of ``repeats`` calls of ``fn(*args)``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def _subset(n: int, size: int, runs: int = 12) -> np.ndarray:
    """``size`` tiles as ``runs`` evenly spaced runs of consecutive tiles (all when n ≤ size)."""
    if n <= size:
        return np.arange(n)
    run = size // runs
    starts = np.linspace(0, n - run, runs).round().astype(np.int64)
    return np.unique(np.concatenate([np.arange(s, s + run) for s in starts]))


# --- report -----------------------------------------------------------------------------
def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=cache_dir() / "bench", help="folder for the generated large slide")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    p.add_argument("--sample", type=int, default=1200, help="tiles of the large slide read by every method at native resolution")
    p.add_argument("--sample-downsampled", type=int, default=400, help="the same when the grid downsamples by 2")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"), help="Markdown file whose 'Tiling' section is replaced")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    load_before = os.getloadavg()

    cmu = fetch_cmu_slide()
    large = large_slide(args.cache)
    cases = [  # (slide label, path, target µm/px, resolution label, sample size or None for all)
        ("CMU-1-Small-Region", cmu, 0.5, "native (0.5 µm/px)", None),
        ("CMU-1-Small-Region", cmu, 1.0, "1.0 µm/px (÷2)", None),
        ("large 40000×30000", large, 0.25, "native (0.25 µm/px)", args.sample),
        ("large 40000×30000", large, 0.5, "0.5 µm/px (÷2)", args.sample_downsampled),
    ]
    rows, coord_rows = [], []
    with tempfile.TemporaryDirectory() as tmp, start_pool(2) as pool:
        # Start both workers and import everything there before any timing.
        [f.result() for f in [pool.submit(time.sleep, 0.5) for _ in range(2)]]
        for slide_label, path, mpp, res_label, sample in cases:
            store = Path(tmp) / f"{path.stem}_{mpp}.zarr"
            secs = _time(args.repeats, tile_slide, path, store, None, TilingConfig(mpp=mpp))
            src = TileSource(store)
            n = len(src)
            coord_rows.append((slide_label, res_label, secs, n, src.attrs["grid_cols"] * src.attrs["grid_rows"]))
            idx = _subset(n, sample) if sample else np.arange(n)
            passes = 1 if sample else max(1, math.ceil(600 / max(n, 1)))
            warm = idx[: 2 * 64]
            ds2 = int(src.attrs["read_size"]) != int(src.attrs["tile_size"])
            for method in METHODS:
                if method == "fast, DCT" and not ds2:
                    continue
                speeds = {}
                for workers in (1, 2):
                    _read(method, store, warm, workers, pool)  # page cache and workers warm
                    secs_read = _time(args.repeats, _read, method, store, idx, workers, pool, passes)
                    speeds[workers] = passes * len(idx) / secs_read
                label = f"{len(idx)} of {n}" if sample else f"all {n} ×{passes}"
                rows.append([slide_label, res_label, src.attrs["read_level"], src.attrs["read_size"], label, method, speeds[1], speeds[2]])
                print(f"{slide_label:20s} {res_label:20s} {method:15s} {speeds[1]:8.0f} {speeds[2]:8.0f} tiles/s", flush=True)
            if sample:
                all_idx = np.arange(n)
                speeds = {w: n / _time(1, _read, "fast", store, all_idx, w, pool) for w in (1, 2)}
                rows.append([slide_label, res_label, src.attrs["read_level"], src.attrs["read_size"], f"all {n}", "fast", speeds[1], speeds[2]])
                print(f"{slide_label:20s} {res_label:20s} {'fast (all)':15s} {speeds[1]:8.0f} {speeds[2]:8.0f} tiles/s", flush=True)
    load_after = os.getloadavg()
    text = report(rows, coord_rows, cmu, large, args, load_before, load_after)
    print(text)
    write_section(args.results, "Tiling", text)
    return 0


def report(rows, coord_rows, cmu: Path, large: Path, args, load_before, load_after) -> str:
    base = {(r[0], r[1]): r for r in rows if r[5] == "openslide loop"}
    lines = [
        f"Machine: {machine()}; {dt.date.today().isoformat()}; Python {platform.python_version()}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share this machine: "
        f"every figure is the best of {args.repeats} runs; fast path on all tiles of the large slide: one run).",
        "",
        f"Slides: CMU-1-Small-Region, real Aperio SVS, 2220×2967 px, 0.499 µm/px, JPEG Q=30 240² tiles with JPEGTables, one level "
        f"({cmu.stat().st_size / 2**20:.1f} MiB); large: generated Aperio-style {LARGE[0]}×{LARGE[1]} px at {LARGE_MPP} µm/px, "
        f"RGB JPEG without chroma subsampling Q={QUALITY}, 256² tiles, levels {'/'.join(map(str, LEVELS))}, mirrored tiles of the real "
        f"slide's pixels ({large.stat().st_size / 2**30:.2f} GiB). Tiles: 256 px.",
        "",
        "### Slide → coordinates (`tile_slide`: open, tissue detection at 8 µm/px, grid, tile store)",
        "",
        "| slide | tiling | seconds | tiles kept | grid tiles |",
        "|---|---|---:|---:|---:|",
    ]
    for slide_label, res_label, secs, n, grid in coord_rows:
        lines.append(f"| {slide_label} | {res_label} | {secs:.2f} | {n} | {grid} |")
    lines += [
        "",
        "### Reading tile pixels (tiles/s; × = ratio to the OpenSlide loop with the same workers; 2w/1w = scaling)",
        "",
        "| slide | tiling | read level, size | tiles read | method | 1 worker | × | 2 workers | × | 2w/1w |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for slide_label, res_label, level, size, label, method, s1, s2 in rows:
        b = base[(slide_label, res_label)]
        same = label == b[4]
        r1 = f"{s1 / b[6]:.1f}×" if same else "–"
        r2 = f"{s2 / b[7]:.1f}×" if same else "–"
        lines.append(f"| {slide_label} | {res_label} | {level}, {size}² | {label} | {method} | {s1:.0f} | {r1} | {s2:.0f} | {r2} | {s2 / s1:.2f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a Markdown file."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    head = f"## {title}\n"
    section = head + "\n" + body
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


if __name__ == "__main__":
    raise SystemExit(main())
