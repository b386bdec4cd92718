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
from histopipe.evaluation.manifold import Footprints

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


def kept_positions(n: int, keep: int, seed: int) -> np.ndarray:
    """Positions (ascending) within a set of n of the ``keep`` images whose features
    :func:`embed_set` keeps for the k-NN metrics."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: max(keep, 0)])


def _window_sides(group: zarr.Group, slides: np.ndarray, coords: np.ndarray) -> dict[str, float] | None:
    """Each slide's patch side in level-0 px: recorded by the patch plan (``per_slide``
    ``size_level0``), else, for stores written before it was, the slide's smallest step
    between patch origins times patch size / stride (the origins lie on that grid)."""
    per_slide = group.attrs.get("per_slide") or {}
    config = group.attrs.get("config") or {}
    sides: dict[str, float] = {}
    for sid in np.unique(slides):
        recorded = (per_slide.get(str(sid)) or {}).get("size_level0")
        if recorded:
            sides[str(sid)] = float(recorded)
            continue
        if not (config.get("stride") and config.get("patch_size")):
            return None
        steps = [np.diff(np.unique(coords[slides == sid, a])) for a in (0, 1)]
        steps = np.concatenate([d[d > 0] for d in steps])
        if not len(steps):
            sides[str(sid)] = 0.0  # one patch: overlaps only itself
            continue
        sides[str(sid)] = float(steps.min()) * float(config["patch_size"]) / float(config["stride"])
    return sides


def patch_footprints(path: str | Path, rows: np.ndarray) -> tuple[Footprints | None, str]:
    """Footprints of patch-store rows ``rows`` (their slide and level-0 window), or None and why."""
    group = open_store(path)
    if "coords" not in group or "slide_id" not in group:
        return None, f"{path}: no coords/slide_id arrays"
    rows = np.asarray(rows, dtype=np.int64)
    slides = np.array([str(v) for v in group["slide_id"][:]], dtype=object)
    coords = np.asarray(group["coords"][:], dtype=np.float64)
    sides = _window_sides(group, slides, coords)
    if sides is None:
        return None, f"{path}: no patch size in level-0 px recorded and no patch stride to infer it"
    side = np.array([sides[s] for s in slides[rows]], dtype=np.float64)
    return Footprints(slides[rows], coords[rows], side), ""


def synthetic_footprints(synthetic: ImageSet, positions: np.ndarray) -> tuple[Footprints | None, str]:
    """Footprints of synthetic images by the patch whose map (and crops) each was made from:
    images of overlapping or identical source patches are not independent. Unconditional
    images depend on no map (None); images of user maps (``source_index`` -1) overlap nothing;
    a patch store given as the synthetic set (a real reference) has its own footprints."""
    if synthetic.attrs.get("variant") == "unconditional":
        return None, "unconditional samples depend on no map"
    group = open_store(synthetic.path)
    if "source_index" not in group and "coords" in group:  # real patches in the synthetic's place
        return patch_footprints(synthetic.path, synthetic.indices[positions])
    source = synthetic.attrs.get("dataset")
    if "source_index" not in group or not source or not Path(source).exists():
        return None, f"{synthetic.path}: no source patches recorded"
    index = np.asarray(group["source_index"][:], dtype=np.int64)[synthetic.indices[positions]]
    known = index >= 0
    fp, why = patch_footprints(source, np.where(known, index, 0))
    if fp is None:
        return None, why
    slide = np.where(known, fp.slide, np.array([f"user-map-{i}" for i in range(len(index))], dtype=object))
    return Footprints(slide, fp.xy, fp.side), ""


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
    keep_mask[kept_positions(n, keep, seed)] = True
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
