"""Per-slide sample stores: the diversity sample of one slide, written by its own job.

``histopipe sample-embeddings`` writes one small zarr v3 group per slide
(``paths.CLUSTER_SAMPLE``), so sampling a cohort is one independent, resumable job per
slide, and the cohort fit reads only these stores, never the embedding stores:

- ``features`` (m, D): the sampled tiles' features as the embedding store holds them
  (float16: half the disk of float32, and no rounding), normalised as configured when read
  (``read_prefix``, ``iter_sample_blocks``), so that the fit sees the float32 values it
  would compute from the embedding store itself;
- ``rows`` int64 (m,): their rows in the slide's embedding store;
- attrs: slide_id, n_tiles (tiles of the slide), dim, encoder, weights_sha256, tiling,
  embeddings (the store sampled), per_slide_cap, seed, normalize, order = "priority",
  features = "raw" (stores without it hold float32 features already normalised).

m = min(n_tiles, per_slide_cap). Rows are in priority order (farthest-point traversal,
``sampling.priority_order``): every prefix is a covering subset, so the cohort step applies
the total cap by reading each slide's prefix of its quota (``slide_quotas``), and gives the
same sample as ``sampling.sample_cohort`` over the embedding stores with the same settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError
from histopipe.sampling import (
    CohortSample,
    SlideSample,
    StoreInfo,
    assemble,
    check_compatible,
    check_unique_slides,
    normalize_rows,
    slide_quotas,
)

ORDER = "priority"
RAW = "raw"  # attrs["features"]: stored as embedded, normalised when read
# Rows per chunk of a sample's features (1.5 MB at D = 1536): a short prefix reads little.
CHUNK_ROWS = 256
# Settings that must match between the sample stores and the fit, or the cohort sample would
# differ from the one the model's config describes.
SETTINGS = ("per_slide_cap", "seed", "normalize")


def write_sample(out: str | Path, sample: SlideSample, per_slide_cap: int, seed: int, normalize: str) -> None:
    """Write one slide's sample store atomically (layout in the module docstring)."""
    info = sample.info
    m, dim = len(sample.rows), info.dim
    attrs = {
        "slide_id": info.slide_id, "n_tiles": info.n, "dim": dim, "encoder": info.attrs.get("encoder"),
        "weights_sha256": info.attrs.get("weights_sha256"), "tiling": info.attrs.get("tiling"),
        "embeddings": str(info.path), "per_slide_cap": int(per_slide_cap), "seed": int(seed),
        "normalize": normalize, "order": ORDER,
    }
    if sample.raw is not None:  # as embedded; normalised when read
        features, attrs["features"] = sample.raw, RAW
    else:  # a sample built without its raw rows: the normalised float32 features
        features = np.asarray(sample.features, dtype=np.float32)
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.create_array("features", data=features.reshape(m, dim), chunks=(max(1, min(m, CHUNK_ROWS)), dim))
        root.create_array("rows", data=np.asarray(sample.rows, dtype=np.int64), chunks=(max(1, m),))
        root.attrs.update(attrs)


@dataclass(frozen=True)
class SampleInfo:
    """A sample store's metadata; ``store.n`` is the slide's tile count, ``m`` the sample's."""

    store: StoreInfo
    m: int


def sample_info(path: str | Path) -> SampleInfo:
    """Shape and attributes of a sample store, checked for consistency, without its data."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        features, rows = group["features"], group["rows"]
    except Exception as err:  # zarr raises several types for a missing/corrupt store
        raise HistopipeError(f"{path}: not a readable sample store (zarr group with 'features' and 'rows'): {err}") from None
    attrs = dict(group.attrs)
    missing = [k for k in ("slide_id", "n_tiles", "order", *SETTINGS) if k not in attrs]
    if missing:
        raise HistopipeError(f"{path}: sample store lacks attrs {missing} (write it with histopipe sample-embeddings)")
    m, n, cap = int(rows.shape[0]), int(attrs["n_tiles"]), int(attrs["per_slide_cap"])
    if features.ndim != 2 or features.shape[0] != m or attrs["order"] != ORDER or m != min(n, cap):
        raise HistopipeError(
            f"{path}: inconsistent sample store: features {features.shape}, rows ({m},), n_tiles {n}, "
            f"per_slide_cap {cap}, order {attrs['order']!r} (expected m = min(n_tiles, per_slide_cap) rows in "
            f"{ORDER!r} order)")
    return SampleInfo(StoreInfo(path, str(attrs["slide_id"]), n, int(features.shape[1]), attrs), m)


def _features(group, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a sample store's features, float32, normalised as sampled."""
    x = np.asarray(group["features"][start:stop], dtype=np.float32)
    return normalize_rows(x, group.attrs["normalize"]) if group.attrs.get("features") == RAW else x


def read_prefix(path: str | Path, q: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``q`` rows of a sample store: rows int64 (q,), features float32 (q, D)."""
    group = zarr.open_group(Path(path), mode="r")
    return np.asarray(group["rows"][:q], dtype=np.int64), _features(group, 0, q)


def open_samples(paths: Sequence[str | Path], per_slide_cap: int, seed: int, normalize: str) -> list[SampleInfo]:
    """Metadata of sample stores, ordered by slide id, checked to come from one encoder
    (a clear error names two stores that do not), to hold distinct slides and to have been
    written with the fit's per_slide_cap, seed and normalize."""
    samples = sorted((sample_info(p) for p in paths), key=lambda s: s.store.slide_id)
    infos = [s.store for s in samples]
    check_compatible(infos)
    check_unique_slides(infos)
    want = {"per_slide_cap": per_slide_cap, "seed": seed, "normalize": normalize}
    for info in infos:
        have = {k: info.attrs[k] for k in SETTINGS}
        if have != want:
            raise HistopipeError(f"{info.path}: sampled with {have}, but the fit's clustering config has {want}; "
                                 "re-run sample-embeddings with the same clustering settings")
    return samples


def iter_sample_blocks(samples: Sequence[SampleInfo], block_rows: int = 16 * CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Every sampled row of every slide, as float32 (≤ block_rows, D) blocks, in slide order.

    The next block is read (and decompressed) in a thread while the caller works on this
    one; at most two blocks are in memory.
    """
    def read(job: tuple[Path, int, int]) -> np.ndarray:
        path, start, stop = job
        return _features(zarr.open_group(path, mode="r"), start, stop)

    jobs = ((s.store.path, a, min(a + block_rows, s.m)) for s in samples for a in range(0, s.m, block_rows))
    with ThreadPoolExecutor(1) as pool:
        ahead = None
        for job in jobs:
            current, ahead = ahead, pool.submit(read, job)
            if current is not None:
                yield current.result()
        if ahead is not None:
            yield ahead.result()


def cohort_from_samples(
    paths: Sequence[str | Path], per_slide_cap: int, total_cap: int, seed: int, normalize: str,
) -> CohortSample:
    """The cohort sample from per-slide sample stores: each slide's prefix of its quota.

    Reads only the sample stores, one at a time; memory is the cohort sample (at most
    ``total_cap`` × D float32). Slides are ordered by slide id. The stores must have been
    written with the given per_slide_cap, seed and normalize.
    """
    infos = [s.store for s in open_samples(paths, per_slide_cap, seed, normalize)]
    quotas = slide_quotas([i.n for i in infos], per_slide_cap, total_cap)

    def prefixes() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for info, q in zip(infos, quotas, strict=True):
            # An empty slide (or a zero quota) is skipped without opening its arrays.
            yield read_prefix(info.path, int(q)) if q else (np.zeros(0, np.int64), np.zeros((0, info.dim), np.float32))

    return assemble(infos, quotas, prefixes())
