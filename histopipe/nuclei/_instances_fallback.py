"""TEMPORARY stand-in for Part A's ``histopipe.nuclei.instances.separate_instances``.

Used only while that module is absent from this branch (the parts are merged later); the
pipeline imports the contract function first. Same signature and outputs as the contract.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed


def fallback_separate_instances(
    semantic: np.ndarray, distance: np.ndarray, points: np.ndarray | None = None, method: str = "marker"
) -> tuple[np.ndarray, dict[int, int]]:
    """(instances int32 (S, S), {instance id: majority class}) from semantic uint8, distance float32 [0, 1]."""
    fg = semantic > 0
    if method == "connectivity":
        inst, _ = ndi.label(fg)
    else:
        markers = np.zeros(semantic.shape, np.int32)
        if method == "marker" and points is not None and len(points):
            for i, (y, x, _) in enumerate(np.asarray(points)):
                markers[int(y), int(x)] = i + 1
        else:
            peaks = peak_local_max(distance, min_distance=2, labels=ndi.label(fg)[0], exclude_border=False)
            for i, (y, x) in enumerate(peaks):
                markers[y, x] = i + 1
        inst = watershed(-distance, markers, mask=fg)
    inst = inst.astype(np.int32)
    # Renumber 1..N (markers on background leave gaps).
    ids = np.unique(inst[inst > 0])
    lut = np.zeros(int(inst.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    inst = lut[inst]
    classes = {}
    for i in range(1, len(ids) + 1):
        vals = semantic[inst == i]
        classes[i] = int(np.bincount(vals, minlength=2)[1:].argmax() + 1)
    return inst, classes
