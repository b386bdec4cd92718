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
    """

    def __init__(self, path: str | Path, split: str | None = "train", level: int = 0):
        root = open_dataset(path)
        super().__init__(path, split, SPLITS, np.asarray(root["split"][:]))
        self.attrs = dict(root.attrs)
        luts = np.asarray(root["level_luts"][:], dtype=np.int64)
        if not 0 <= level < len(luts):
            raise ConfigError(f"{path}: level {level} out of range (the store has {len(luts)} levels)")
        self.level = level
        self.lut = luts[level]
        self.num_labels = int(luts[level].max()) + 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = int(self.indices[i])
        r = self.root
        labels = self.lut[np.asarray(r["maps"][n], dtype=np.int64)]
        return {
            "image": image_tensor(r["images"][n]),
            "map": torch.from_numpy(labels),
            "crop_boxes": torch.from_numpy(np.asarray(r["crop_boxes"][n], dtype=np.int64)),
            "crop_labels": torch.from_numpy(self.lut[np.asarray(r["crop_labels"][n], dtype=np.int64)]),
            "crop_valid": torch.from_numpy(np.asarray(r["crop_valid"][n], dtype=bool)),
            "index": n,
        }
