"""In-memory nuclei datasets for the evaluation tests (coloured discs on a pink background,
known classes)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

BACKGROUND = (232, 182, 205)
# Class 1 dark purple, class 2 blue, class 3 (rare in the training set) brown.
CLASS_COLOURS = {1: (80, 30, 120), 2: (40, 70, 170), 3: (130, 70, 30)}
CLASS_NAMES = ("background", "lymphocyte", "epithelial", "neutrophil")


def disc_sample(size: int, rng: np.random.Generator, class_probs=(0.5, 0.4, 0.1),
                n_discs: tuple[int, int] = (3, 7), noise: float = 8.0,
                colours=CLASS_COLOURS) -> dict:
    """One sample in the NucleiDataset tensor layout, plus ``instances`` int64 (S, S):
    non-touching discs of radius 2-4 px, class drawn with ``class_probs`` (classes 1..3)."""
    instances = np.zeros((size, size), np.int32)
    semantic = np.zeros((size, size), np.uint8)
    points = np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    n_target = int(rng.integers(*n_discs, endpoint=True))
    label = 0
    for _ in range(200):
        if label == n_target:
            break
        r = int(rng.integers(2, 5))
        cy, cx = rng.integers(r + 1, size - r - 1, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        # Keep a one-pixel gap so nuclei never touch.
        if (ndimage.binary_dilation(disc) & (instances > 0)).any():
            continue
        label += 1
        cls = int(rng.choice([1, 2, 3], p=class_probs))
        instances[disc] = label
        semantic[disc] = cls
        points[cy, cx] = cls
    edt = ndimage.distance_transform_edt(instances > 0)
    peak = ndimage.maximum(edt, instances, index=np.arange(label + 1))
    peak = np.asarray(peak, np.float64)
    peak[0] = 1.0
    distance = (edt / peak[instances]).astype(np.float32)
    rgb = np.array([BACKGROUND, *(colours[k] for k in (1, 2, 3))], np.float32)[semantic]
    rgb += rng.normal(0, noise, rgb.shape)
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    return {
        "image": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
        "distance": torch.from_numpy(distance)[None] * 2 - 1,
        "semantic": torch.from_numpy(semantic.astype(np.int64)),
        "points": torch.from_numpy(points),
        "tissue": torch.tensor(0),
        "instances": torch.from_numpy(instances.astype(np.int64)),
    }


class ListDataset(Dataset):
    """A torch Dataset over a list of sample dicts (the NucleiDataset item layout)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def disc_dataset(n: int, size: int = 32, seed: int = 0, **kwargs) -> ListDataset:
    rng = np.random.default_rng(seed)
    return ListDataset([disc_sample(size, rng, **kwargs) for _ in range(n)])
