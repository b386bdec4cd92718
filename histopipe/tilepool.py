"""Reading all tiles of a store with worker processes, one contiguous band each.

Each worker takes a contiguous band of the store's (row-major) tiles, so a file tile shared by
neighbouring grid tiles is decoded once per worker, and applies a function to every batch it
reads (a checksum in the benchmark, an encoder's forward pass in the embedding stage). The
results come back in tile order. Workers are started with ``spawn`` (no inherited slide
handles or threads) and use one OpenCV thread each, so N workers use N cores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import numpy as np

from histopipe.tiling import TileSource

T = TypeVar("T")
BatchFn = Callable[[np.ndarray, np.ndarray], Any]


def bands(n: int, parts: int) -> list[range]:
    """Split ``range(n)`` into at most ``parts`` contiguous, non-empty bands of near-equal
    length (none when ``n`` is 0)."""
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def start_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` reader processes (spawned, one OpenCV thread each); reuse it
    across calls of :func:`map_batches` to pay the start-up once."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker)


def _read_band(source: TileSource, indices: np.ndarray, fn: BatchFn, batch_size: int) -> list:
    return [fn(idx, tiles) for idx, tiles in source.iter_batches(indices, batch_size)]


def _read_band_in_worker(source: TileSource, indices: np.ndarray, fn: BatchFn, batch_size: int) -> list:
    try:
        return _read_band(source, indices, fn, batch_size)
    finally:
        source.close()  # this unpickled copy is done; free its file handles


def map_batches(source: TileSource, fn: BatchFn, workers: int = 1, batch_size: int = 64,
                indices: Sequence[int] | np.ndarray | None = None, executor: Executor | None = None) -> list:
    """``fn(indices int64 (B,), tiles uint8 (B, S, S, 3))`` for every batch of tiles, in order.

    ``indices`` (default: all tiles, row-major) are split into ``workers`` contiguous bands,
    each read by one process of ``executor`` (a pool from :func:`start_pool`; one is started
    and shut down here when not given). ``workers=1`` without an executor reads in this
    process. ``fn`` must be picklable (a module-level function) when workers are used.
    """
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64).ravel()
    if workers <= 1 and executor is None:
        return _read_band(source, idx, fn, batch_size)
    own = executor is None
    executor = executor or start_pool(workers)
    try:
        futures = [executor.submit(_read_band_in_worker, source, idx[band.start : band.stop], fn, batch_size) for band in bands(len(idx), workers)]
        return [result for f in futures for result in f.result()]
    finally:
        if own:
            executor.shutdown()
