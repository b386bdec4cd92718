"""``NucleiDataset``: the patches of a nuclei store as a torch ``Dataset``.

Importable as ``histopipe.nuclei.store.NucleiDataset`` (kept here so that writing stores
does not import torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from histopipe.nuclei.store import SPLITS, open_nuclei_store
from histopipe.patch_dataset import SplitStoreDataset, image_tensor


class NucleiDataset(SplitStoreDataset):
    """Patches of one split (``None``: all) of a nuclei store.

    Items are dicts (S = patch size): ``image`` float32 (3, S, S) in [-1, 1]; ``tissue``
    int64 scalar; ``index`` (row in the store); and, for labelled stores, ``distance``
    float32 (1, S, S) in [-1, 1] (2d - 1); ``semantic`` int64 (S, S) class ids;
    ``points`` int64 (S, S) point raster (class id at each centroid); ``instances`` int64
    (S, S) ids 1..n. The store is opened lazily in each process (DataLoader workers).
    """

    def __init__(self, path: str | Path, split: str | None = "train"):
        root = open_nuclei_store(path)
        super().__init__(path, split, SPLITS, np.asarray(root["split"][:]))
        self.attrs = dict(root.attrs)
        self.labels = bool(self.attrs.get("labels", True))
        self.class_names = tuple(self.attrs.get("class_names", ()))
        self.tissue_names = tuple(self.attrs.get("tissue_names", ()))
        self.patch_size = int(self.attrs["patch_size"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = int(self.indices[i])
        r = self.root
        item: dict[str, Any] = {
            "image": image_tensor(r["image"][n]),
            "tissue": torch.tensor(int(r["tissue"][n]), dtype=torch.int64),
            "index": n,
        }
        if self.labels:
            dist = torch.from_numpy(np.asarray(r["distance"][n], dtype=np.float32))
            item["distance"] = dist.mul_(2.0).sub_(1.0).unsqueeze(0)
            item["semantic"] = torch.from_numpy(np.asarray(r["semantic"][n], dtype=np.int64))
            item["points"] = torch.from_numpy(np.asarray(r["points"][n], dtype=np.int64))
            item["instances"] = torch.from_numpy(np.asarray(r["instances"][n], dtype=np.int64))
        return item
