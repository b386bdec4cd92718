"""Geometry of labelled regions: where a square fits entirely inside a region's mask."""

from __future__ import annotations

import numpy as np


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row/column: ``(h + 1, w + 1)`` int64."""
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1, out=ii[1:, 1:])
    return ii


def box_sums(ii: np.ndarray, y0: np.ndarray, x0: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sum of the mask inside boxes with top-left ``(y0, x0)`` and size ``h × w``."""
    return ii[y0 + h, x0 + w] - ii[y0, x0 + w] - ii[y0 + h, x0] + ii[y0, x0]


def square_fits(mask: np.ndarray, side: int) -> np.ndarray:
    """Boolean ``(h - side + 1, w - side + 1)``: True where a ``side``-px square with that
    top-left corner lies fully inside ``mask``. Empty when the square is larger than the mask."""
    h, w = mask.shape
    if side > h or side > w or side <= 0:
        return np.zeros((max(h - side + 1, 0), max(w - side + 1, 0)), dtype=bool)
    ii = integral_image(mask)
    # box_sums over every top-left corner at once, as shifted views of the table.
    sums = ii[side:, side:] - ii[:-side, side:] - ii[side:, :-side] + ii[:-side, :-side]
    return sums == side * side


def largest_square(mask: np.ndarray) -> int:
    """Side (px) of the largest axis-aligned square fully inside ``mask`` (0 if empty)."""
    lo, hi = 0, min(mask.shape)
    while lo < hi:  # "a square of side s fits" is monotone in s
        mid = (lo + hi + 1) // 2
        if square_fits(mask, mid).any():
            lo = mid
        else:
            hi = mid - 1
    return lo


def sample_square(mask: np.ndarray, side: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """Uniformly random top-left ``(y, x)`` of a ``side``-px square inside ``mask``, or None."""
    fits = square_fits(mask, side)
    idx = np.flatnonzero(fits)
    if idx.size == 0:
        return None
    y, x = np.unravel_index(idx[rng.integers(idx.size)], fits.shape)
    return int(y), int(x)
