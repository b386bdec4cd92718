"""Small tile stores (contract #1) and embedding stores (contract #2) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from histopipe.paths import tiling_id
from histopipe.tiling import write_tile_store as write_tile_store_


def grid_coords(rows: int, cols: int, stride: int, origin: tuple[int, int] = (0, 0), keep: np.ndarray | None = None) -> np.ndarray:
    """Level-0 (x, y) top-left corners of a row-major tile grid; ``keep`` (rows, cols) bool."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    coords = np.stack([origin[0] + xs * stride, origin[1] + ys * stride], axis=-1)
    if keep is not None:
        coords = coords[keep]
    return coords.reshape(-1, 2).astype(np.int64)


def write_tile_store(
    path: Path, coords: np.ndarray, *, slide_id: str, width: int, height: int, tile_size: int = 256,
    slide_path: str | Path = "", slide_mpp: float = 0.5, target_mpp: float = 0.5, read_level: int = 0,
) -> Path:
    """A tile store with contract #1 attrs (no overlap: stride = tile size at level 0)."""
    tile_l0 = tile_size * target_mpp / slide_mpp
    attrs = {
        "slide_id": slide_id, "slide_path": str(slide_path), "backend": "openslide",
        "slide_mpp": slide_mpp, "target_mpp": target_mpp, "tile_size": tile_size, "overlap": 0,
        "tile_size_level0": tile_l0, "stride_level0": tile_l0, "read_level": read_level,
        "read_size": int(round(tile_l0)), "level0_width": width, "level0_height": height,
        "n_tiles": len(coords), "status": "ok" if len(coords) else "empty", "reason": "",
        "tiling": tiling_id(target_mpp, tile_size),
    }
    write_tile_store_(path, coords, np.ones(len(coords), dtype=np.float32), attrs)
    return path


def write_embedding_store(path: Path, features: np.ndarray, coords: np.ndarray, *, slide_id: str, encoder: str = "synthetic") -> Path:
    g = zarr.open_group(path, mode="w")
    g.create_array("features", data=np.asarray(features), chunks=(max(1, min(len(features), 64)), features.shape[1]))
    g.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    g.attrs.update({
        "encoder": encoder, "dim": int(features.shape[1]), "weights_sha256": "0" * 64,
        "dtype": str(features.dtype), "tiling": "mpp0.5_px256", "slide_id": slide_id,
        "n_tiles": len(features), "input_size": 224,
    })
    return path


def blobs(n: int, centers: np.ndarray, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around randomly chosen ``centers`` (K, D): float32 (n, D) and the blob ids."""
    which = rng.integers(len(centers), size=n)
    x = centers[which] + spread * rng.standard_normal((n, centers.shape[1]))
    return x.astype(np.float32), which


def write_sample_store(path: Path, features: np.ndarray, *, slide_id: str, per_slide_cap: int, seed: int = 0,
                       normalize: str = "l2", encoder: str = "synthetic", n_tiles: int | None = None) -> Path:
    """A per-slide sample store holding ``features`` (m, D) as the slide's whole sample, in
    priority order, as ``sample-embeddings`` would write it (without an embedding store)."""
    from histopipe.sampling import SlideSample, StoreInfo, normalize_rows, priority_order
    from histopipe.slide_samples import write_sample

    x = normalize_rows(features, normalize)
    order = priority_order(x) if len(x) else np.zeros(0, np.int64)
    attrs = {"encoder": encoder, "weights_sha256": "0" * 64, "tiling": "mpp0.5_px256"}
    info = StoreInfo(path.with_suffix(".emb.zarr"), slide_id, len(x) if n_tiles is None else n_tiles, x.shape[1], attrs)
    write_sample(path, SlideSample(order.astype(np.int64), x[order], info), per_slide_cap, seed, normalize)
    return path
