"""Nuclei label maps and the targets derived from them (semantic, distance, centroids).

Conventions (see NUCLEI_CONTRACTS.md): ``instances`` int32 (H, W), 0 = background and
1..N nuclei; ``semantic`` uint8 (H, W) class id per pixel, 0 = background; ``distance``
float32 (H, W) in [0, 1]; ``points`` int64 (N, 3) rows ``(y, x, class)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Class names of the published datasets, index = class id, "background" first.
CONIC_CLASSES: tuple[str, ...] = (
    "background", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective",
)
PANNUKE_CLASSES: tuple[str, ...] = (
    "background", "neoplastic", "inflammatory", "connective", "dead", "epithelial",
)


def relabel(instances: np.ndarray) -> np.ndarray:
    """Instance ids made consecutive (1..N in order of first id), int32; 0 stays 0."""
    instances = np.asarray(instances)
    ids = np.unique(instances)
    ids = ids[ids != 0]
    if len(ids) and ids[-1] == len(ids) and ids[0] == 1:
        return instances.astype(np.int32, copy=False)
    out = np.zeros(instances.shape, dtype=np.int32)
    if len(ids):
        # searchsorted maps each id to its rank without a lookup table as large as the max id.
        fg = instances != 0
        out[fg] = np.searchsorted(ids, instances[fg]) + 1
    return out


def semantic_map(instances: np.ndarray, classes_of: dict[int, int]) -> np.ndarray:
    """Per-pixel class ids uint8 (H, W) from instances and each instance's class.

    Instances missing from ``classes_of`` get class 0 (they become background).
    """
    instances = np.asarray(instances)
    top = int(instances.max()) if instances.size else 0
    lut = np.zeros(top + 1, dtype=np.uint8)
    for inst, cls in classes_of.items():
        if 0 < inst <= top:
            lut[inst] = cls
    return lut[instances]


def instance_classes(instances: np.ndarray, semantic: np.ndarray) -> dict[int, int]:
    """Majority class of each instance ``{id: class}``.

    Background pixels under an instance (annotation slop at the border) only win when the
    instance has no class pixel at all; ties go to the smaller class id.
    """
    instances = np.asarray(instances, dtype=np.int64).ravel()
    semantic = np.asarray(semantic, dtype=np.int64).ravel()
    fg = instances > 0
    if not fg.any():
        return {}
    inst, sem = instances[fg], semantic[fg]
    n_cls = int(sem.max()) + 1
    ids, idx = np.unique(inst, return_inverse=True)
    counts = np.bincount(idx * n_cls + sem, minlength=len(ids) * n_cls).reshape(len(ids), n_cls)
    fore = counts[:, 1:].argmax(axis=1) + 1 if n_cls > 1 else np.zeros(len(ids), dtype=np.int64)
    has_fore = counts[:, 1:].sum(axis=1) > 0 if n_cls > 1 else np.zeros(len(ids), dtype=bool)
    return {int(i): int(c) if h else 0 for i, c, h in zip(ids, fore, has_fore, strict=True)}


def _edt_per_instance(instances: np.ndarray):
    """Yield ``(id, slices, mask, edt)`` per instance; the EDT is of that nucleus alone, so
    it falls to 1 px at a border shared with a touching nucleus as well as at background."""
    for i, sl in enumerate(ndimage.find_objects(instances), start=1):
        if sl is None:
            continue
        mask = np.pad(instances[sl] == i, 1)
        edt = ndimage.distance_transform_edt(mask)[1:-1, 1:-1]
        yield i, sl, mask[1:-1, 1:-1], edt


def distance_map(instances: np.ndarray) -> np.ndarray:
    """Normalised distance map float32 (H, W) in [0, 1] (paper 002).

    Each nucleus's Euclidean distance transform (px to the nearest pixel outside it)
    divided by its own maximum, so every nucleus peaks at 1 whatever its size; 0 outside.
    """
    instances = np.asarray(instances, dtype=np.int32)
    out = np.zeros(instances.shape, dtype=np.float32)
    for _, sl, mask, edt in _edt_per_instance(instances):
        peak = edt.max()
        if peak > 0:
            out[sl][mask] = (edt[mask] / peak).astype(np.float32)
    return out


def centroids(instances: np.ndarray, semantic: np.ndarray) -> np.ndarray:
    """Nucleus centroids int64 (N, 3) rows ``(y, x, class)`` in instance-id order.

    The rounded geometric centroid when it lies inside the nucleus; otherwise (non-convex
    nuclei, e.g. a crescent) the nucleus's innermost pixel (EDT maximum), so the point
    map always marks a pixel of its own nucleus (watershed markers need that).
    """
    instances = np.asarray(instances, dtype=np.int32)
    classes = instance_classes(instances, semantic)
    rows = []
    for i, sl, mask, edt in _edt_per_instance(instances):
        ys, xs = np.nonzero(mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        if not mask[cy, cx]:
            cy, cx = np.unravel_index(int(np.argmax(np.where(mask, edt, -1))), mask.shape)
        rows.append((int(cy) + sl[0].start, int(cx) + sl[1].start, classes.get(i, 0)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def point_raster(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Point map uint8 ``shape`` with each point's class id at its ``(y, x)``, 0 elsewhere.

    Points outside ``shape`` are dropped; a point of class 0 would be invisible, so it is
    an error.
    """
    points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    if (points[:, 2] < 1).any() or (points[:, 2] > 255).any():
        raise ValueError("point classes must be in 1..255 (0 is background)")
    out = np.zeros(shape, dtype=np.uint8)
    inside = (points[:, 0] >= 0) & (points[:, 0] < shape[0]) & (points[:, 1] >= 0) & (points[:, 1] < shape[1])
    p = points[inside]
    out[p[:, 0], p[:, 1]] = p[:, 2]
    return out


def points_from_raster(raster: np.ndarray) -> np.ndarray:
    """Inverse of :func:`point_raster`: int64 (N, 3) rows ``(y, x, class)`` in raster order."""
    ys, xs = np.nonzero(raster)
    return np.stack([ys, xs, raster[ys, xs]], axis=1).astype(np.int64).reshape(-1, 3)
