"""``PatchDataset``: the training patches of a dataset store as a torch ``Dataset``.

Importable as ``histopipe.dataset.PatchDataset`` (kept here so that writing stores does not
import torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from histopipe.dataset import SPLITS, open_dataset
from histopipe.errors import ConfigError


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) → float32 (3, S, S) in [-1, 1]."""
    image = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(2, 0, 1)))
    return image.float().div_(127.5).sub_(1.0)


class SplitStoreDataset(Dataset):
    """Rows of one split of a zarr store whose ``split`` array holds indices into ``splits``
    (``split=None``: every row). The store is opened lazily in each process, so one object
    serves many DataLoader workers."""

    def __init__(self, path: str | Path, split: str | None, splits: tuple[str, ...], codes: np.ndarray):
        self.path = Path(path)
        if split is None:
            self.indices = np.arange(len(codes))
        elif split in splits:
            self.indices = np.flatnonzero(codes == splits.index(split))
        else:
            raise ConfigError(f"{path}: unknown split {split!r} (choose {', '.join(splits)} or None)")
        self.split = split
        self._root: zarr.Group | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_root"] = None
        return state

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(str(self.path), mode="r")
        return self._root


class PatchDataset(SplitStoreDataset):
    """Training patches of one split as a torch ``Dataset`` (contract #4).

    ``level`` maps the finest labels (of the map and of the crops) through
    ``level_luts[level]`` (0 = finest) for a coarse-to-fine curriculum. Items are dicts:
    ``image`` float32 (3, S, S) in [-1, 1]; ``map`` int64 (S, S); ``crop_boxes`` int64 (C, 3)
    (y0, x0, side in image px); ``crop_labels`` int64 (C,); ``crop_valid`` bool (C,);
    ``index`` (row in the store). ``split=None`` gives every patch.

    ``in_memory``: read the split's rows into memory on first use (one read per array
    instead of one per item and array: several times faster for the small stores a CPU
    trains on; each DataLoader worker holds its own copy).
    """

    def __init__(self, path: str | Path, split: str | None = "train", level: int = 0, in_memory: bool = False):
        root = open_dataset(path)
        super().__init__(path, split, SPLITS, np.asarray(root["split"][:]))
        self.attrs = dict(root.attrs)
        luts = np.asarray(root["level_luts"][:], dtype=np.int64)
        if not 0 <= level < len(luts):
            raise ConfigError(f"{path}: level {level} out of range (the store has {len(luts)} levels)")
        self.level = level
        self.lut = luts[level]
        self.num_labels = int(luts[level].max()) + 1
        self.in_memory = in_memory
        self._rows: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_rows"] = None
        return state

    def nbytes(self) -> int:
        """Bytes of the split's images and maps (what ``in_memory`` holds)."""
        r = self.root
        per_row = np.prod(r["images"].shape[1:]) * r["images"].dtype.itemsize + np.prod(r["maps"].shape[1:]) * r["maps"].dtype.itemsize
        return int(per_row * len(self.indices))

    def _row(self, name: str, i: int) -> np.ndarray:
        if not self.in_memory:
            return np.asarray(self.root[name][int(self.indices[i])])
        if self._rows is None:
            self._rows = {k: np.asarray(self.root[k].oindex[self.indices]) for k in ("images", "maps", "crop_boxes", "crop_labels", "crop_valid")}
        return self._rows[name][i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        labels = self.lut[np.asarray(self._row("maps", i), dtype=np.int64)]
        return {
            "image": image_tensor(self._row("images", i)),
            "map": torch.from_numpy(labels),
            "crop_boxes": torch.from_numpy(np.asarray(self._row("crop_boxes", i), dtype=np.int64)),
            "crop_labels": torch.from_numpy(self.lut[np.asarray(self._row("crop_labels", i), dtype=np.int64)]),
            "crop_valid": torch.from_numpy(np.asarray(self._row("crop_valid", i), dtype=bool)),
            "index": int(self.indices[i]),
        }
