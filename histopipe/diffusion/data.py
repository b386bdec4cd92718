"""Readers of the training-patch store and the crop bank (data contract #4).

``PatchStore`` yields the same dicts as ``histopipe.dataset.PatchDataset`` (image float32
(3, S, S) in [-1, 1], map int64 (S, S), crop_boxes int64 (C, 3), crop_labels int64 (C,),
crop_valid bool (C,)) plus ``index`` (row in the store), so training accepts either. It always
returns the finest map level; the training loop applies ``level_luts`` itself because the
curriculum changes the level during a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from histopipe.errors import HistopipeError

SPLITS = {"train": 0, "val": 1, "test": 2}
_PATCH_ARRAYS = ("images", "maps", "level_luts", "crop_boxes", "crop_labels", "crop_valid")


def open_group(path: str | Path, arrays: tuple[str, ...], what: str) -> zarr.Group:
    """Open a zarr group read-only and check that it holds ``arrays``."""
    path = Path(path)
    if not path.exists():
        raise HistopipeError(f"{path}: {what} not found")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a non-store
        raise HistopipeError(f"{path}: not a zarr store ({type(err).__name__}: {err})") from None
    missing = [a for a in arrays if a not in group]
    if missing:
        raise HistopipeError(f"{path}: {what} lacks array(s) {missing}")
    return group


class PatchStore(Dataset):
    """Patches of one split of a ``patches.zarr`` store (contract #4)."""

    def __init__(self, path: str | Path, split: str | None = "train"):
        self.path = Path(path)
        group = open_group(self.path, _PATCH_ARRAYS, "patch store")
        if split is not None and split not in SPLITS:
            raise HistopipeError(f"{self.path}: unknown split {split!r} (train, val, test)")
        self.split = split
        self.attrs = dict(group.attrs)
        self.level_luts = np.asarray(group["level_luts"][:], dtype=np.int64)
        if split is None or "split" not in group:
            self.indices = np.arange(group["images"].shape[0])
        else:
            self.indices = np.flatnonzero(np.asarray(group["split"][:]) == SPLITS[split])
        self.patch_size = int(group["images"].shape[1])
        self.num_labels = int(self.attrs.get("num_labels", self.level_luts.shape[1]))
        self.label_names = list(self.attrs.get("label_names", []))
        self._slide_ids = np.array([str(v) for v in group["slide_id"][:]], dtype=object) if "slide_id" in group else None
        self._group: zarr.Group | None = None  # opened lazily in each DataLoader worker

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_group"] = None
        return state

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    @property
    def level_num_labels(self) -> list[int]:
        """Label count (incl. background) of each map level, finest first."""
        return [int(row.max()) + 1 for row in self.level_luts]

    def slide_id(self, i: int) -> str:
        return "" if self._slide_ids is None else str(self._slide_ids[self.indices[i]])

    def raw(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` of the split as stored: image uint8 (S, S, 3), map uint16 (S, S), crops."""
        n = int(self.indices[i])
        g = self.group
        return {
            "index": n,
            "image": np.asarray(g["images"][n]),
            "map": np.asarray(g["maps"][n]),
            "crop_boxes": np.asarray(g["crop_boxes"][n]),
            "crop_labels": np.asarray(g["crop_labels"][n]),
            "crop_valid": np.asarray(g["crop_valid"][n]),
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.raw(i)
        image = torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 127.5 - 1.0
        return {
            "index": torch.tensor(r["index"]),
            "image": image,
            "map": torch.from_numpy(r["map"].astype(np.int64)),
            "crop_boxes": torch.from_numpy(r["crop_boxes"].astype(np.int64)),
            "crop_labels": torch.from_numpy(r["crop_labels"].astype(np.int64)),
            "crop_valid": torch.from_numpy(r["crop_valid"].astype(bool)),
        }


class CropBank:
    """The crop bank of a patch dataset: crops (M, B, B, 3) uint8 with their region labels."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        group = open_group(self.path, ("crops", "labels", "side"), "crop bank")
        self.crops = group["crops"]
        self.labels = np.asarray(group["labels"][:], dtype=np.int64)
        self.side = np.asarray(group["side"][:], dtype=np.int64)
        self._by_label = {int(lab): np.flatnonzero(self.labels == lab) for lab in np.unique(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def has(self, label: int) -> bool:
        return int(label) in self._by_label

    def draw(self, label: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A random crop of ``label``, resized back to its original side: (uint8 (s, s, 3), row)."""
        rows = self._by_label[int(label)]
        row = int(rows[rng.integers(len(rows))])
        return resize_square(np.asarray(self.crops[row]), int(self.side[row])), row


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """Centre square of ``image`` (h, w, 3) uint8 resized to ``side`` px (area/bilinear)."""
    import cv2

    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    sq = np.ascontiguousarray(image[y0 : y0 + s, x0 : x0 + s])
    if s == side:
        return sq
    interp = cv2.INTER_AREA if side < s else cv2.INTER_LINEAR
    return cv2.resize(sq, (side, side), interpolation=interp)
