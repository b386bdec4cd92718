"""A constructed cohort on which a small model can learn in a minute or two: every tissue type
has its own colour and texture, each region's colour varies a little from patch to patch (so
that a crop tells more about its region than the type does), and a colour classifier can
tell the types apart in any image. Used by the tests that check whether the diffusion models
follow their maps and use their crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from histopipe.regions import sample_square

# Background (white) + four tissue types of clearly different hue.
TYPE_COLOURS = np.array([(236, 236, 236), (200, 60, 70), (70, 80, 200), (70, 180, 80), (200, 190, 60)], float)
NAMES = ["background", "red", "blue", "green", "yellow"]
JITTER = 20  # per-patch colour shift of a region, per channel (grey levels)


def _texture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative pattern (size, size) in [0.8, 1.0] per type: stripes, dots, checks."""
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = {
        0: np.zeros((size, size)),
        1: (yy // 2) % 2,
        2: (xx // 2) % 2,
        3: ((yy // 2 + xx // 2) % 2),
        4: rng.integers(0, 2, (size, size)),
    }[label]
    return 1.0 - 0.2 * pattern


def random_map(size: int, rng: np.random.Generator) -> np.ndarray:
    """2–3 regions from a random straight cut (and a corner block), with types 1–4 and
    sometimes background."""
    types = rng.choice([0, 1, 2, 3, 4], size=3, replace=False, p=[0.1, 0.225, 0.225, 0.225, 0.225])
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.25, 0.25) * size
    side = (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)) > offset
    m = np.where(side, types[0], types[1]).astype(np.uint16)
    if rng.random() < 0.5:
        q = size // 2
        y0, x0 = rng.integers(0, size - q + 1, 2)
        m[y0 : y0 + q, x0 : x0 + q] = types[2]
    return m


def paint(label_map: np.ndarray, rng: np.random.Generator, colours: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """uint8 image (S, S, 3) of a map: each region its type's colour (jittered, or ``colours``)
    times its texture, plus a little noise."""
    size = label_map.shape[0]
    img = np.zeros((size, size, 3))
    for label in np.unique(label_map):
        colour = (colours or {}).get(int(label))
        if colour is None:
            colour = TYPE_COLOURS[label] + rng.uniform(-JITTER, JITTER, 3)
        region = label_map == label
        img[region] = colour[None] * _texture(int(label), size, rng)[region][:, None]
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def make_cohort(n: int, size: int = 32, max_crops: int = 3, seed: int = 0, n_slides: int = 8):
    """Arrays of a contract-#4 patch store with ``n`` patches."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    maps = np.zeros((n, size, size), np.uint16)
    boxes = np.zeros((n, max_crops, 3), np.int32)
    labels = np.zeros((n, max_crops), np.uint16)
    valid = np.zeros((n, max_crops), bool)
    for i in range(n):
        m = random_map(size, rng)
        images[i], maps[i] = paint(m, rng), m
        present = [t for t in np.unique(m) if t > 0]
        for k, t in enumerate(present[:max_crops]):
            side = int(rng.integers(6, 11))
            pos = sample_square(m == t, side, rng)
            if pos is not None:
                boxes[i, k], labels[i, k], valid[i, k] = (pos[0], pos[1], side), t, True
    slides = np.array([f"slide{i % n_slides}" for i in range(n)], dtype=object)
    return images, maps, boxes, labels, valid, slides


def write_cohort(path: Path, n: int = 192, size: int = 32, max_crops: int = 3, seed: int = 0) -> Path:
    """A patches.zarr as contract #4 describes it; slides 0–5 train, 6 val, 7 test."""
    images, maps, boxes, labels, valid, slides = make_cohort(n, size, max_crops, seed)
    split = np.array([0 if int(s[5:]) < 6 else (1 if s == "slide6" else 2) for s in slides], np.uint8)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("images", data=images, chunks=(1, size, size, 3))
    g.create_array("maps", data=maps, chunks=(1, size, size))
    g.create_array("level_luts", data=np.arange(len(NAMES), dtype=np.int32)[None])
    g.create_array("crop_boxes", data=boxes)
    g.create_array("crop_labels", data=labels)
    g.create_array("crop_valid", data=valid)
    sid = g.create_array("slide_id", shape=(n,), dtype=str)
    sid[:] = slides
    g.create_array("coords", data=np.zeros((n, 2), np.int64))
    g.create_array("split", data=split)
    g.attrs.update(patch_size=size, mpp=2.0, num_labels=len(NAMES), label_names=NAMES, levels=[len(NAMES) - 1],
                   max_crops=max_crops, crop_range=[6, 10], splits={}, source="synthetic-test")
    return path


def colour_labels(images: np.ndarray, block: int = 4) -> np.ndarray:
    """The colour classifier: each ``block``×``block`` cell of uint8 images (N, S, S, 3) gets
    the type whose colour is nearest to the cell's mean (texture averages out); (N, S/b, S/b)."""
    n, s = images.shape[:2]
    cells = images.reshape(n, s // block, block, s // block, block, 3).mean((2, 4))
    # Textures darken by 10 % on average: compare with the mean painted colour.
    ref = TYPE_COLOURS * np.array([1.0, 0.9, 0.9, 0.9, 0.9])[:, None]
    return np.argmin(((cells[..., None, :] - ref) ** 2).sum(-1), axis=-1)


def block_majority(maps: np.ndarray, block: int = 4) -> np.ndarray:
    """Majority label of each block×block cell of maps (N, S, S) → (N, S/b, S/b)."""
    n, s = maps.shape[:2]
    cells = maps.reshape(n, s // block, block, s // block, block).transpose(0, 1, 3, 2, 4).reshape(n, s // block, s // block, -1)
    counts = np.stack([(cells == t).sum(-1) for t in range(len(NAMES))], -1)
    return counts.argmax(-1)


def map_agreement(images: np.ndarray, maps: np.ndarray, block: int = 4) -> float:
    """Label fidelity with the colour classifier: share of cells whose colour class is the
    map's majority label there (cells on a region boundary left out)."""
    n, s = maps.shape[:2]
    cells = maps.reshape(n, s // block, block, s // block, block)
    pure = (cells.min((2, 4)) == cells.max((2, 4)))
    agree = colour_labels(images, block) == block_majority(maps, block)
    return float(agree[pure].mean())


def threads(n: int):
    """Context manager: torch uses ``n`` threads inside."""

    class _Threads:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Threads()
