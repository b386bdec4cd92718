"""Tiny synthetic nuclei data for the model tests: discs on a tissue-coloured background,
as the tensor dicts of Part A's ``NucleiDataset`` (so the tests need no store)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from histopipe.nuclei.settings import NucleiModelSettings, NucleiTrainSettings

CLASS_NAMES = ["background", "neutrophil", "epithelial", "lymphocyte"]
TISSUE_NAMES = ["colon", "breast"]
SIZE = 32
CLASS_RGB = {1: (90, 30, 120), 2: (160, 60, 150), 3: (40, 20, 90)}
TISSUE_RGB = {0: (235, 200, 220), 1: (245, 225, 235)}


def disc_item(seed: int, size: int = SIZE) -> dict[str, torch.Tensor]:
    """One item: 2-4 non-overlapping discs (radius 3-5 px) of random classes."""
    rng = np.random.default_rng(seed)
    tissue = seed % len(TISSUE_NAMES)
    img = np.zeros((size, size, 3)) + TISSUE_RGB[tissue]
    sem = np.zeros((size, size), np.int64)
    dist = np.zeros((size, size), np.float32)
    pts = np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[0:size, 0:size]
    placed: list[tuple[int, int, int]] = []
    while len(placed) < 2 + seed % 3:
        r = int(rng.integers(3, 6))
        y, x = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
        if any((y - py) ** 2 + (x - px) ** 2 < (r + pr + 1) ** 2 for py, px, pr in placed):
            continue
        placed.append((y, x, r))
        c = int(rng.integers(1, 4))
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        inside = d < r
        sem[inside] = c
        img[inside] = CLASS_RGB[c]
        dist[inside] = (r - d[inside]) / r  # each nucleus's own distance transform / its max
        pts[y, x] = c
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
    return {
        "image": torch.from_numpy(img / 127.5 - 1).permute(2, 0, 1).float(),
        "distance": torch.from_numpy(dist * 2 - 1)[None],
        "semantic": torch.from_numpy(sem),
        "points": torch.from_numpy(pts),
        "tissue": torch.tensor(tissue),
    }


class DiscDataset(Dataset):
    """``n`` disc items (deterministic by index)."""

    def __init__(self, n: int = 8, size: int = SIZE):
        self.items = [disc_item(i, size) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def tiny_model(**kw) -> NucleiModelSettings:
    base = dict(
        image_size=SIZE, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        first_attention_level=1, attention_heads=2, cross_attention_dim=32, point_channels=8, timesteps=100,
    )
    return NucleiModelSettings(**{**base, **kw})


def tiny_train(**kw) -> NucleiTrainSettings:
    base = dict(
        batch_size=4, num_workers=0, warmup_steps=0, lr_schedule="constant", lr=2e-3, checkpoint_every=1000,
        sample_every=0, log_every=1, mixed_precision="fp32", seed=0, augment_flip=False, ema_decay=0.0, sample_steps=2,
    )
    return NucleiTrainSettings(**{**base, **kw})
