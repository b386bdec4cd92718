"""Image sets read from zarr stores, and their features in a registry encoder.

Both the training-patch store (contract #4: ``images``, ``maps``, ``split``) and the synthetic
store (``images``, ``maps``) are read through ``ImageSet``: a list of row indices into the
store's ``images`` array, optionally restricted to one split and to a seeded random subset.
Rows are read in ascending order, one batch at a time, so a set never has to fit in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import zarr

from histopipe.errors import HistopipeError
from histopipe.evaluation.frechet import RunningStats

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "val": 1, "test": 2}


class FeatureEncoder(Protocol):
    """What evaluation needs from ``histopipe.encoders.get_encoder(...)``."""

    dim: int

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, D)."""
        ...


def open_store(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise HistopipeError(f"{path}: store not found")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a non-store folder
        raise HistopipeError(f"{path}: not a readable zarr group ({err})") from None
    if "images" not in group:
        raise HistopipeError(f"{path}: no `images` array")
    images = group["images"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise HistopipeError(
            f"{path}: `images` must be uint8 (N, S, S, 3), is {images.dtype} {images.shape}"
        )
    return group


@dataclass
class ImageSet:
    """Rows ``indices`` (ascending) of the ``images`` (and ``maps``) arrays of a store."""

    path: Path
    indices: np.ndarray
    split: str
    n_available: int
    attrs: dict = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        path: str | Path,
        split: str = "all",
        max_samples: int | None = None,
        seed: int = 0,
    ) -> ImageSet:
        """Select rows of a store: ``split`` is train|val|test|all (``all`` also for stores
        without a ``split`` array); ``max_samples`` draws a seeded subset without replacement."""
        path = Path(path)
        group = open_store(path)
        n = group["images"].shape[0]
        if split == "all":
            rows = np.arange(n)
        elif split in SPLITS:
            if "split" not in group:
                raise HistopipeError(f"{path}: no `split` array, cannot select split {split!r}")
            rows = np.flatnonzero(group["split"][:] == SPLITS[split])
        else:
            raise HistopipeError(f"unknown split {split!r} (train, val, test or all)")
        n_available = len(rows)
        if n_available == 0:
            raise HistopipeError(f"{path}: no images in split {split!r}")
        if max_samples is not None and n_available > max_samples:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
        return cls(path, rows.astype(np.int64), split, n_available, dict(group.attrs))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_size(self) -> int:
        return int(open_store(self.path)["images"].shape[1])

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of n rows (all rows when n >= len)."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.indices, size=n, replace=False))
        return ImageSet(self.path, rows, self.split, self.n_available, self.attrs)

    def read(self, rows: np.ndarray, maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Images uint8 (B, S, S, 3) (and maps uint16 (B, S, S)) of store rows ``rows``."""
        group = open_store(self.path)
        rows = np.asarray(rows, dtype=np.int64)
        images = group["images"].oindex[rows]
        label_maps = None
        if maps:
            if "maps" not in group:
                raise HistopipeError(f"{self.path}: no `maps` array")
            label_maps = group["maps"].oindex[rows]
        return images, label_maps

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Images uint8 (B, S, S, 3), ``batch_size`` rows at a time, in row order."""
        group = open_store(self.path)
        for start in range(0, len(self.indices), batch_size):
            yield group["images"].oindex[self.indices[start : start + batch_size]]

    def describe(self) -> dict:
        """Path, split and counts, plus the synthesis attributes a synthetic store carries."""
        out = {
            "path": str(self.path),
            "split": self.split,
            "n_available": int(self.n_available),
            "n_used": len(self),
        }
        synthesis = {k: self.attrs[k] for k in ("variant", "seed", "guidance") if k in self.attrs}
        if synthesis:
            out["attrs"] = synthesis
        return out


def embed_set(
    encoder: FeatureEncoder,
    images: ImageSet,
    batch_size: int,
    keep: int = 0,
    seed: int = 0,
) -> tuple[RunningStats, np.ndarray]:
    """Embed every image of the set; return the streamed feature statistics and the features
    float32 (min(keep, N), D) of a seeded random ``keep`` of the images (for k-NN metrics)."""
    n = len(images)
    keep_mask = np.zeros(n, dtype=bool)
    keep_mask[np.random.default_rng(seed).permutation(n)[: max(keep, 0)]] = True
    stats = RunningStats(encoder.dim)
    kept: list[np.ndarray] = []
    start = 0
    with torch.inference_mode():
        for batch in images.batches(batch_size):
            feats = encoder.embed(batch)
            feats = feats.detach().float().cpu().numpy() if torch.is_tensor(feats) else feats
            feats = np.asarray(feats, dtype=np.float32)
            if feats.shape != (len(batch), encoder.dim):
                raise HistopipeError(
                    f"encoder returned features {feats.shape}, expected ({len(batch)}, {encoder.dim})"
                )
            stats.update(feats)
            kept.append(feats[keep_mask[start : start + len(batch)]])
            start += len(batch)
    kept_arr = np.concatenate(kept) if kept else np.zeros((0, encoder.dim), np.float32)
    log.info("embedded %d images of %s", stats.n, images.path)
    return stats, kept_arr
