"""What the diffusion stage reads from a training-patch store and its crop bank (contract #4).

Training reads ``histopipe.dataset.PatchDataset`` at the finest level and applies
``level_luts`` itself, because the coarse-to-fine curriculum changes the level during a run.
Synthesis needs the stored pixels and boxes (``PatchRows``) and crops of the bank at their
original size (``BankCrops``, over ``histopipe.cropbank.CropBank``), so that a pasted crop
keeps its physical scale.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import zarr

from histopipe.cropbank import CropBank
from histopipe.dataset import SPLITS, open_dataset, read_strings
from histopipe.errors import HistopipeError


def open_training_set(path: str | Path, split: str = "train", memory_mb: float = 0):
    """The patches of ``split`` as a torch Dataset of contract-#4 dicts (finest labels), held
    in memory when its images and maps take at most ``memory_mb`` MiB."""
    from histopipe.dataset import PatchDataset  # imports torch

    data = PatchDataset(path, split, level=0)
    data.in_memory = data.nbytes() <= memory_mb * 2**20
    return data


def store_info(path: str | Path) -> dict:
    """Attributes of a patch store plus ``patch_size`` (px) and ``level_luts`` int64 (L, num_labels)."""
    root = open_dataset(path)
    info = dict(root.attrs)
    info["patch_size"] = int(root["images"].shape[1])
    info["level_luts"] = np.asarray(root["level_luts"][:], dtype=np.int64)
    info.setdefault("label_names", [])
    return info


class PatchRows:
    """Rows of one split of a patch store as stored: uint8 image, uint16 map and crop boxes."""

    def __init__(self, path: str | Path, split: str | None = "test"):
        self.path = Path(path)
        self.root = open_dataset(self.path)
        if split is not None and split not in SPLITS:
            raise HistopipeError(f"{self.path}: unknown split {split!r} (choose {', '.join(SPLITS)})")
        codes = np.asarray(self.root["split"][:])
        self.indices = np.arange(len(codes)) if split is None else np.flatnonzero(codes == SPLITS.index(split))
        self.level_luts = np.asarray(self.root["level_luts"][:], dtype=np.int64)
        self.slide_ids = read_strings(self.root["slide_id"])

    def __len__(self) -> int:
        return len(self.indices)

    def slide_id(self, i: int) -> str:
        return str(self.slide_ids[self.indices[i]])

    def raw(self, i: int) -> dict:
        """Row ``i`` of the split: index (row in the store), image uint8 (S, S, 3), map uint16
        (S, S), crop_boxes (C, 3) (y0, x0, side), crop_labels (C,), crop_valid (C,)."""
        n = int(self.indices[i])
        r = self.root
        return {
            "index": n,
            "image": np.asarray(r["images"][n]),
            "map": np.asarray(r["maps"][n]),
            "crop_boxes": np.asarray(r["crop_boxes"][n]),
            "crop_labels": np.asarray(r["crop_labels"][n]),
            "crop_valid": np.asarray(r["crop_valid"][n]),
        }


class BankCrops:
    """Crops of a crop bank drawn by tissue label, resized back to their original side (px)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bank = CropBank(self.path)
        self.sides = np.asarray(zarr.open_group(str(self.path), mode="r")["side"][:], dtype=np.int64)
        self.labels = np.asarray(self.bank.labels, dtype=np.int64)

    def has(self, label: int) -> bool:
        return self.bank.has(label)

    def draw(self, label: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A random crop of ``label``: (uint8 (s, s, 3) at its original side s, bank row)."""
        rows = np.flatnonzero(self.labels == int(label))
        if rows.size == 0:
            raise HistopipeError(f"{self.path}: no crops of label {label}")
        row = int(rows[rng.integers(rows.size)])
        return center_square(self.bank[row], int(self.sides[row])), row


def center_square(image: np.ndarray, side: int) -> np.ndarray:
    """The centre square of ``image`` (h, w, 3) uint8, resized to ``side`` px."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    sq = np.ascontiguousarray(image[y0 : y0 + s, x0 : x0 + s])
    if s == side:
        return sq
    return cv2.resize(sq, (side, side), interpolation=cv2.INTER_AREA if side < s else cv2.INTER_LINEAR)
