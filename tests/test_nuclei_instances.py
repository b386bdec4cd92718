"""Instance separation on constructed touching nuclei whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from histopipe.nuclei.instances import separate_instances
from histopipe.nuclei.labels import centroids, distance_map, point_raster, semantic_map


def touching_discs(centres: list[tuple[int, int]], radius: int, size: int = 96) -> np.ndarray:
    """Overlapping discs split along their bisectors: each pixel of the union belongs to the
    nearest centre. Instances int32 (size, size), ids 1..len(centres)."""
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.stack([np.hypot(yy - y, xx - x) for y, x in centres])
    inst = np.where(d.min(axis=0) <= radius, d.argmin(axis=0) + 1, 0)
    return inst.astype(np.int32)


def iou_per_nucleus(truth: np.ndarray, pred: np.ndarray) -> list[float]:
    """Best IoU of each true nucleus against any predicted one."""
    out = []
    for i in range(1, int(truth.max()) + 1):
        t = truth == i
        ids = np.unique(pred[t])
        ids = ids[ids > 0]
        out.append(max((float((t & (pred == j)).sum() / (t | (pred == j)).sum()) for j in ids), default=0.0))
    return out


CASES = {
    "two": [(48, 36), (48, 60)],
    "three": [(40, 34), (40, 58), (61, 46)],
}


def _triplet(centres):
    inst = touching_discs(centres, radius=14)
    classes = {i: 1 + (i - 1) % 3 for i in range(1, len(centres) + 1)}
    sem = semantic_map(inst, classes)
    return inst, classes, sem, distance_map(inst)


@pytest.mark.parametrize("case", sorted(CASES))
def test_marker_watershed_recovers_touching_nuclei(case):
    inst, classes, sem, dist = _triplet(CASES[case])
    pts = centroids(inst, sem)
    for points in (point_raster(pts, inst.shape), pts):  # raster or rows
        pred, pred_classes = separate_instances(sem, dist, points, method="marker")
        assert pred.dtype == np.int32 and pred.max() == len(CASES[case])
        assert min(iou_per_nucleus(inst, pred)) > 0.9
        # Each predicted nucleus carries its true nucleus's class.
        for j, c in pred_classes.items():
            true_id = np.bincount(inst[pred == j]).argmax()
            assert c == classes[true_id]


@pytest.mark.parametrize("case", sorted(CASES))
def test_markerless_watershed_splits_clean_distance_maps(case):
    inst, _, sem, dist = _triplet(CASES[case])
    pred, _ = separate_instances(sem, dist, method="watershed")
    assert pred.max() == len(CASES[case])
    assert min(iou_per_nucleus(inst, pred)) > 0.85


def test_markerless_watershed_is_not_split_by_pixel_noise():
    # A synthesised distance map carries pixel noise; unsmoothed, its spikes become markers.
    inst, _, sem, dist = _triplet(CASES["two"])
    noisy = np.clip(dist + np.random.default_rng(0).normal(0, 0.1, dist.shape), 0, 1).astype(np.float32)
    assert separate_instances(sem, noisy, method="watershed", smooth=0)[0].max() > 2
    pred, _ = separate_instances(sem, noisy, method="watershed")
    assert pred.max() == 2 and min(iou_per_nucleus(inst, pred)) > 0.85


@pytest.mark.parametrize("case", sorted(CASES))
def test_connectivity_merges_touching_nuclei(case):
    inst, _, sem, dist = _triplet(CASES[case])
    pred, classes = separate_instances(sem, dist, method="connectivity")
    # The baseline's known failure: one object for the whole cluster, with one class.
    assert pred.max() == 1 and len(classes) == 1
    assert max(iou_per_nucleus(inst, pred)) < 0.6


def test_empty_map_and_unreached_blobs():
    z = np.zeros((32, 32), np.uint8)
    for method in ("marker", "watershed", "connectivity"):
        pred, classes = separate_instances(z, z.astype(np.float32), np.zeros((32, 32), np.uint8), method=method)
        assert pred.shape == (32, 32) and not pred.any() and classes == {}
    # A blob without its point is kept as its own nucleus; tiny specks are dropped.
    inst = touching_discs([(10, 10), (22, 22)], radius=5, size=32)
    sem = semantic_map(inst, {1: 2, 2: 3})
    sem[0, 31] = 1  # 1-px speck
    pts = centroids(inst, sem)[:1]
    pred, classes = separate_instances(sem, distance_map(inst), pts, method="marker", min_size=5)
    assert pred.max() == 2 and sorted(classes.values()) == [2, 3] and pred[0, 31] == 0


def test_bad_arguments():
    z = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="point map"):
        separate_instances(z + 1, z.astype(np.float32), method="marker")
    with pytest.raises(ValueError, match="unknown method"):
        separate_instances(z, z.astype(np.float32), method="magic")
    with pytest.raises(ValueError, match="shape"):
        separate_instances(z, np.zeros((4, 4), np.float32), method="connectivity")
