"""Tiny synthetic inputs for the diffusion tests: a contract-#4 patch store, a crop bank and
tiny model settings. Regions are textured by tissue type, so that a model can learn them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from histopipe.cropbank import build_crop_bank
from histopipe.diffusion.settings import LDMSettings, VAESettings
from histopipe.patches import CropBankConfig
from histopipe.regions import sample_square

NUM_LABELS = 5  # background + 4 tissue types
LEVEL_LUTS = np.array([[0, 1, 2, 3, 4], [0, 1, 1, 2, 2]], dtype=np.int32)
LABEL_NAMES = ["background", "tumour", "stroma", "fat", "necrosis"]
SPLITS = ("train", "train", "train", "train", "train", "val", "test", "test")

TINY_TRAIN = dict(
    batch_size=4, num_workers=0, warmup_steps=0, lr_schedule="constant", checkpoint_every=1000,
    sample_every=0, log_every=1, mixed_precision="fp32", seed=0, augment_flip=False,
)


def tiny_vae(**kw) -> VAESettings:
    return VAESettings(**{**TINY_TRAIN, "block_out_channels": (32, 32), "layers_per_block": 1, "latent_channels": 4, "lr": 1e-3, **kw})


def tiny_ldm(**kw) -> LDMSettings:
    base = dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_heads=2, cross_attention_dim=32,
        map_embed_dim=4, max_crops=3, crop_feature_encoder="thumbnail", lr=1e-3, weight_decay=0.0,
        ema_decay=0.0, augment_stain=0.0, augment_brightness=0.0, sample_steps=2,
    )
    return LDMSettings(**{**TINY_TRAIN, **base, **kw})


def texture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3): a colour and pattern per tissue type, with a little noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = {0: (240, 240, 240), 1: (150, 40, 110), 2: (230, 150, 190), 3: (250, 235, 240), 4: (120, 60, 160)}[label]
    pattern = {0: 0 * yy, 1: (yy // 3) % 2, 2: (xx // 3) % 2, 3: ((yy // 4 + xx // 4) % 2), 4: rng.integers(0, 2, yy.shape)}[label]
    img = np.asarray(base, float)[None, None] * (0.75 + 0.25 * pattern[..., None])
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def make_patches(n: int = 8, size: int = 32, max_crops: int = 3, seed: int = 0):
    """Arrays of a patch store: images, maps, crop boxes/labels/valid."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    maps = np.zeros((n, size, size), np.uint16)
    boxes = np.zeros((n, max_crops, 3), np.int32)
    labels = np.zeros((n, max_crops), np.uint16)
    valid = np.zeros((n, max_crops), bool)
    for i in range(n):
        types = rng.choice([1, 2, 3, 4], size=2 + i % 2, replace=False)
        m = np.full((size, size), types[0], np.uint16)
        cut = int(rng.integers(size // 3, 2 * size // 3))
        if i % 2:
            m[:, cut:] = types[1]
        else:
            m[cut:, :] = types[1]
        if len(types) == 3:
            m[: size // 2, : size // 2] = types[2]
        for t in types:
            images[i][m == t] = texture(int(t), size, rng)[m == t]
        maps[i] = m
        for k, t in enumerate(types[:max_crops]):
            side = int(rng.integers(6, 11))
            pos = sample_square(m == t, side, rng)
            if pos is not None:
                boxes[i, k] = (pos[0], pos[1], side)
                labels[i, k] = t
                valid[i, k] = True
    return images, maps, boxes, labels, valid


def write_patch_store(path: Path, n: int = 8, size: int = 32, max_crops: int = 3, seed: int = 0) -> Path:
    """A patches.zarr exactly as contract #4 describes it."""
    images, maps, boxes, labels, valid = make_patches(n, size, max_crops, seed)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("images", data=images, chunks=(1, size, size, 3))
    g.create_array("maps", data=maps, chunks=(1, size, size))
    g.create_array("level_luts", data=LEVEL_LUTS)
    g.create_array("crop_boxes", data=boxes)
    g.create_array("crop_labels", data=labels)
    g.create_array("crop_valid", data=valid)
    slide_ids = np.array([f"slide{i // 3}" for i in range(n)], dtype=object)
    sid = g.create_array("slide_id", shape=(n,), dtype=str)
    sid[:] = slide_ids
    g.create_array("coords", data=np.stack([np.arange(n) * size, np.zeros(n)], 1).astype(np.int64))
    split_codes = {"train": 0, "val": 1, "test": 2}
    g.create_array("split", data=np.array([split_codes[SPLITS[i % len(SPLITS)]] for i in range(n)], np.uint8))
    g.attrs.update(
        patch_size=size, mpp=0.5, num_labels=NUM_LABELS, label_names=LABEL_NAMES, levels=[4, 2],
        max_crops=max_crops, crop_range=[6, 10], splits={}, source="synthetic-test",
    )
    return path


def write_crop_bank(patches: Path, path: Path, per_type: int = 3, size: int = 16) -> Path:
    """The crop bank of a patch store, built by the dataset stage's own builder."""
    build_crop_bank(patches, path, CropBankConfig(per_type=per_type, size=size, splits=("train",)))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster and deterministically on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
