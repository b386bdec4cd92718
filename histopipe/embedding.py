"""Embed every tile of a tile store with a patch encoder; write the embedding store.

Tiles are read straight from the slide by their coordinates in DataLoader worker processes,
resized there on uint8 (a quarter of the bytes of float32), and normalised on the device,
so that slide decoding overlaps the model's compute. Order is the tile store's order, so
row ``i`` of ``features`` belongs to ``coords[i]`` whatever the number of workers.

Output (zarr v3, written atomically): ``features`` (N, D) float16/float32, ``coords`` int64
(N, 2) copied from the tile store; attributes encoder, dim, weights_sha256, dtype, tiling,
slide_id, n_tiles, input_size and more. An existing store made from the same tiles with the
same encoder weights and dtype is kept (the slide is skipped) unless ``force``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from histopipe import __version__
from histopipe.atomic import atomic_path
from histopipe.encoders import Encoder, TileTransform, get_spec, resolve_weights
from histopipe.encoders.registry import (
    EncoderSpec,
    ResolvedWeights,
    autocast,
    autocast_dtype,
    build_model,
    resolve_device,
)
from histopipe.errors import ConfigError, HistopipeError
from histopipe.tiling import TileSource, TileStore

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
CHUNK_ROWS = 4096
# Attributes that must match for an existing store to be reused.
RESUME_KEYS = ("encoder", "weights_sha256", "dtype", "dim", "tiling", "n_tiles", "coords_sha256")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Embedding settings (config section ``embedding``)."""

    encoder: str = "efficientnet_lite0"
    weights: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "float16"
    device: str = "auto"
    precision: str = "auto"
    online: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"embedding.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"embedding.num_workers must be >= 0, got {self.num_workers}")
        for key, value, allowed in (("dtype", self.dtype, DTYPES), ("precision", self.precision, PRECISIONS), ("device", self.device, DEVICES)):
            if value not in allowed and not (key == "device" and str(value).startswith("cuda:")):
                raise ConfigError(f"embedding.{key} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class EmbeddingResult:
    slide_id: str
    path: Path
    n_tiles: int
    dim: int
    skipped: bool
    seconds: float

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 and not self.skipped else 0.0


class TileDataset(Dataset):
    """Tiles of a ``TileSource`` as uint8 ``(3, S, S)`` tensors at the encoder's input size."""

    def __init__(self, source: TileSource, transform: TileTransform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.source[i])


def _worker_init(_: int) -> None:
    import cv2

    # One thread per worker: the workers are the parallelism; more threads only contend.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def tile_loader(source: TileSource, transform: TileTransform, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches of uint8 ``(B, 3, S, S)`` tiles in store order (no shuffling).

    Workers are spawned, not forked: a child forked from a process whose OpenCV (or
    OpenMP) thread pool has run deadlocks on the pool's inherited locks, and callers (the
    tiler, tests, notebooks) use OpenCV before embedding. Spawning costs ~1-3 s per call.
    """
    return DataLoader(
        TileDataset(source, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )


def coords_sha256(coords: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(coords, dtype="<i8").tobytes()).hexdigest()


def store_attrs(spec: EncoderSpec, weights: ResolvedWeights, tiles: TileStore, dtype: str, coords_hash: str) -> dict[str, Any]:
    a = tiles.attrs
    return {
        "encoder": spec.name,
        "architecture": spec.architecture,
        "dim": spec.dim,
        "input_size": spec.input_size,
        "crop_pct": spec.crop_pct,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "pooling": spec.pooling,
        "weights_sha256": weights.sha256,
        "weights_source": spec.weights_source,
        "weights_file": str(weights.path) if weights.path else None,
        "dtype": dtype,
        "tiling": a.get("tiling"),
        "slide_id": a.get("slide_id"),
        "n_tiles": len(tiles),
        "tile_size": a.get("tile_size"),
        "target_mpp": a.get("target_mpp"),
        "tile_store": str(Path(tiles.path).resolve()),
        "tile_status": a.get("status"),
        "coords_sha256": coords_hash,
        "histopipe_version": __version__,
    }


def existing_matches(out: str | Path, expected: dict[str, Any]) -> bool:
    """True when ``out`` is a complete embedding store made with the same inputs."""
    out = Path(out)
    if not out.exists():
        return False
    try:
        root = zarr.open_group(str(out), mode="r")
        attrs = dict(root.attrs)
        shape = root["features"].shape
    except Exception:
        return False
    same = all(attrs.get(k) == expected[k] for k in RESUME_KEYS)
    return same and tuple(shape) == (expected["n_tiles"], expected["dim"])


def embed_tiles(
    tiles: str | Path,
    out: str | Path,
    cfg: EmbeddingConfig | None = None,
    *,
    encoder: Encoder | None = None,
    force: bool = False,
    progress: bool = True,
) -> EmbeddingResult:
    """Embed all tiles of the tile store ``tiles`` into the embedding store ``out``.

    ``encoder``: an already built encoder (reused across slides; ``cfg.encoder`` and
    ``cfg.weights`` are then ignored). Skips the slide when ``out`` already holds the same
    result, unless ``force``. An empty tile store gives a valid ``(0, D)`` store.
    """
    t0 = time.perf_counter()
    cfg = cfg or EmbeddingConfig()
    out = Path(out)
    store = TileStore(tiles)
    if encoder is not None:
        spec = encoder.spec
        weights = ResolvedWeights(encoder.weights_path, encoder.weights_sha256, encoder.weights_origin)
    else:
        spec = get_spec(cfg.encoder)
        weights = resolve_weights(spec, cfg.weights, cfg.online)
    attrs = store_attrs(spec, weights, store, cfg.dtype, coords_sha256(store.coords))
    slide_id = attrs["slide_id"] or Path(tiles).stem
    if not force and existing_matches(out, attrs):
        log.info("%s: %s already embedded with %s (same tiles and weights): kept", slide_id, out, spec.name)
        return EmbeddingResult(slide_id, out, len(store), spec.dim, True, time.perf_counter() - t0)

    n = len(store)
    if n == 0:
        _write(out, store.coords, np.zeros((0, spec.dim), dtype=cfg.dtype), attrs)
        return EmbeddingResult(slide_id, out, 0, spec.dim, False, time.perf_counter() - t0)

    device = resolve_device(cfg.device) if encoder is None else encoder.device
    if encoder is None:
        encoder = _build(spec, weights, device)
    amp = autocast_dtype(cfg.precision, device, spec)
    attrs["precision"] = str(amp).replace("torch.", "") if amp is not None else "float32"
    attrs["device"] = str(device)
    source = TileSource(store)
    loader = tile_loader(source, encoder.transform, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        chunk = min(n, CHUNK_ROWS)
        features = root.create_array("features", shape=(n, spec.dim), dtype=cfg.dtype, chunks=(chunk, spec.dim))
        root.create_array("coords", data=store.coords.astype(np.int64), chunks=(max(1, min(n, 65536)), 2))
        buffer = np.empty((chunk, spec.dim), dtype=cfg.dtype)
        start = filled = 0
        bar = _progress(n, slide_id, progress)
        with torch.inference_mode():
            for batch in loader:
                x = encoder.normalize(batch).contiguous(memory_format=torch.channels_last)
                with autocast(device, amp):
                    y = encoder(x)
                y = y.float().cpu().numpy()
                _check_finite(y, slide_id, cfg.dtype)
                i = 0
                while i < len(y):  # fill whole chunks, write each once
                    take = min(len(y) - i, chunk - filled)
                    buffer[filled : filled + take] = y[i : i + take]
                    filled += take
                    i += take
                    if filled == chunk or start + filled == n:
                        features[start : start + filled] = buffer[:filled]
                        start += filled
                        filled = 0
                bar.update(len(y))
        bar.close()
        if start != n:
            raise HistopipeError(f"{tiles}: embedded {start} of {n} tiles (tile reading stopped early)")
        source.close()
        root.attrs.update(attrs)
    seconds = time.perf_counter() - t0
    log.info("%s: %d tiles embedded with %s in %.1f s (%.1f tiles/s)", slide_id, n, spec.name, seconds, n / seconds)
    return EmbeddingResult(slide_id, out, n, spec.dim, False, seconds)


def _build(spec: EncoderSpec, weights: ResolvedWeights, device: torch.device) -> Encoder:
    encoder = Encoder(spec, build_model(spec, weights), weights).to(device)
    return encoder.to(memory_format=torch.channels_last)


def _check_finite(y: np.ndarray, slide_id: str, dtype: str) -> None:
    if not np.isfinite(y).all():
        raise HistopipeError(f"{slide_id}: the encoder produced NaN/inf features (try precision fp32)")
    if dtype == "float16" and np.abs(y).max() > np.finfo(np.float16).max:
        raise HistopipeError(f"{slide_id}: features exceed the float16 range; set embedding.dtype: float32")


def _write(out: Path, coords: np.ndarray, features: np.ndarray, attrs: dict[str, Any]) -> None:
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        rows = max(1, min(len(features), CHUNK_ROWS))
        root.create_array("features", data=features, chunks=(rows, features.shape[1]))
        root.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2), chunks=(max(1, min(len(coords), 65536)), 2))
        root.attrs.update(attrs)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, mininterval=1.0, smoothing=0.1)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features (N, D), coords (N, 2) int64, attrs)`` of an embedding store."""
    root = zarr.open_group(str(path), mode="r")
    return root["features"][:], root["coords"][:], dict(root.attrs)
