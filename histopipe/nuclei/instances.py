"""Instance separation: nuclei instances from a semantic map and a distance map (paper 002).

Three methods:

- ``marker``: marker-controlled watershed on ``-distance`` inside the semantic foreground,
  one marker per point of the point map (the centroid layout a joint model is conditioned
  on), as in paper 002. Foreground blobs that no point reaches are kept as their own
  instances (a synthesised nucleus without its point is still a nucleus).
- ``watershed``: marker-free baseline, markers from the h-maxima of the (lightly smoothed)
  distance map.
- ``connectivity``: connected components of the foreground (merges touching nuclei).

Each instance's class is the majority semantic class under it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from histopipe.nuclei.labels import instance_classes, relabel

METHODS = ("marker", "watershed", "connectivity")
# 8-connectivity: nuclei drawn or predicted as diagonal runs of pixels stay one object.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def _point_markers(points: np.ndarray, shape: tuple[int, int], foreground: np.ndarray) -> np.ndarray:
    """Markers int32 (H, W), one id per point inside the foreground. ``points`` is a raster
    (H, W) (non-zero at centroids) or rows ``(y, x[, class])``."""
    points = np.asarray(points)
    if points.shape == shape:
        ys, xs = np.nonzero(points)
    else:
        pts = points.reshape(-1, points.shape[-1] if points.ndim == 2 else 3).astype(np.int64)
        ys, xs = pts[:, 0], pts[:, 1]
        inside = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
        ys, xs = ys[inside], xs[inside]
    keep = foreground[ys, xs]
    markers = np.zeros(shape, dtype=np.int32)
    markers[ys[keep], xs[keep]] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return markers


def _maxima_markers(distance: np.ndarray, foreground: np.ndarray, h: float, smooth: float) -> np.ndarray:
    # h-maxima ignore peaks less than h above their surroundings, and the map is first
    # smoothed (Gaussian, ``smooth`` px): a synthesised or predicted distance map carries
    # pixel-level noise whose spikes would otherwise each become a marker and split a nucleus.
    surface = np.where(foreground, distance, 0).astype(np.float64)
    if smooth > 0:
        surface = np.where(foreground, ndimage.gaussian_filter(surface, smooth), 0)
    peaks = h_maxima(surface, h).astype(bool) & foreground
    markers, _ = ndimage.label(peaks, structure=_STRUCTURE)
    return markers.astype(np.int32)


def _add_unreached(instances: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Give foreground components that no marker reached their own ids."""
    rest = foreground & (instances == 0)
    if not rest.any():
        return instances
    extra, n = ndimage.label(rest, structure=_STRUCTURE)
    out = instances.copy()
    out[extra > 0] = extra[extra > 0] + int(instances.max())
    return out


def _remove_small(instances: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or not instances.any():
        return instances
    sizes = np.bincount(instances.ravel())
    small = np.flatnonzero(sizes < min_size)
    small = small[small > 0]
    return np.where(np.isin(instances, small), 0, instances) if len(small) else instances


def separate_instances(semantic: np.ndarray, distance: np.ndarray, points: np.ndarray | None = None,
                       method: str = "marker", min_size: int = 10, h: float = 0.1,
                       smooth: float = 1.0) -> tuple[np.ndarray, dict[int, int]]:
    """Instances int32 (H, W), ids 1..N, and ``{id: class}`` from a semantic map and a distance map.

    ``semantic``: class ids (H, W), 0 background. ``distance``: (H, W) in [0, 1] (values in
    [-1, 1] as models produce them are mapped back by the caller: ``(d + 1) / 2``).
    ``points``: the point map, raster (H, W) or rows ``(y, x, class)``; required by
    ``marker``. ``min_size``: instances smaller than this (px) are dropped. ``h``: height
    of the distance maxima used as markers by ``watershed``, found after smoothing the map by a
    Gaussian of ``smooth`` px (0: none).
    """
    semantic = np.asarray(semantic)
    distance = np.asarray(distance, dtype=np.float32)
    if semantic.shape != distance.shape:
        raise ValueError(f"semantic {semantic.shape} and distance {distance.shape} differ in shape")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose {', '.join(METHODS)})")
    foreground = semantic > 0
    if not foreground.any():
        return np.zeros(semantic.shape, dtype=np.int32), {}
    if method == "connectivity":
        instances, _ = ndimage.label(foreground, structure=_STRUCTURE)
    else:
        if method == "marker":
            if points is None:
                raise ValueError("method 'marker' needs the point map (points)")
            markers = _point_markers(points, semantic.shape, foreground)
        else:
            markers = _maxima_markers(distance, foreground, h, smooth)
        instances = watershed(-distance, markers, mask=foreground) if markers.any() else np.zeros(semantic.shape, np.int32)
        instances = _add_unreached(instances.astype(np.int32), foreground)
    instances = relabel(_remove_small(instances.astype(np.int32), min_size))
    return instances, instance_classes(instances, semantic)
