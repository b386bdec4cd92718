"""Slide QC beyond the tissue threshold: pen ink, blur per tile, stain statistics.

- Ink (:func:`ink_mask`): marker pen on the glass or over the tissue is saturated like
  stained tissue, so Otsu on saturation keeps it. H&E stains sit between purple and pink
  (hue about 250°–360°); blue and green ink lie outside that band, and black ink is darker
  than any stained tissue at a low resolution. The rules are colour ranges in HSV on the
  thumbnail the tissue mask is computed on.
- Blur (:func:`tile_sharpness`): the variance of the Laplacian of each tile's grey levels,
  on the slide read at ``blur_mpp`` µm/px. Out-of-focus regions and folds lose the fine
  edges of nuclei and fibres that make it large.
- Stain statistics (:func:`stain_stats`): mean hue, saturation and value of the tissue, so
  that a slide stained or scanned unlike the rest of the cohort stands out in the slide table.
"""

from __future__ import annotations

import cv2
import numpy as np

# Hue ranges in degrees (0-360) of the ink colours.
INK_HUES = {"blue": (190.0, 245.0), "green": (70.0, 170.0)}


def ink_mask(image: np.ndarray, mpp: float, colors: tuple[str, ...] | list[str], min_saturation: float,
             black_max_value: float, halo_um: float = 16.0) -> np.ndarray:
    """Pen-ink pixels of an RGB uint8 image at ``mpp`` µm/px, as a bool ``(h, w)`` mask.

    ``colors``: any of ``blue``, ``green`` (hue range, saturation at least ``min_saturation``)
    and ``black`` (HSV value at most ``black_max_value``, 0-1). Single pixels are dropped (an
    opening of one pixel) and strokes are grown by ``halo_um`` µm to cover their blurred edge.
    """
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hue = hsv[..., 0].astype(np.float32) * 2.0
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2].astype(np.float32) / 255.0
    ink = np.zeros(image.shape[:2], dtype=bool)
    for c in colors:
        if c in INK_HUES:
            lo, hi = INK_HUES[c]
            ink |= (hue >= lo) & (hue <= hi) & (sat >= min_saturation)
        elif c == "black":
            ink |= val <= black_max_value
        else:
            raise ValueError(f"unknown ink colour {c!r} (blue, green, black)")
    if not ink.any():
        return ink
    k3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    ink = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN, k3).astype(bool)
    r = int(round(halo_um / mpp))
    if r > 0 and ink.any():
        ink = cv2.dilate(ink.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(bool)
    return ink


def tile_sharpness(image: np.ndarray, scale: float, coords: np.ndarray, tile_l0: float) -> np.ndarray:
    """Variance of the Laplacian of each tile's grey levels, float32 ``(N,)``.

    ``image``: the slide as RGB uint8 at ``scale`` level-0 px per image px; ``coords``:
    level-0 top-left corners ``(N, 2)`` (x, y) of tiles of side ``tile_l0`` level-0 px.
    Computed for all tiles at once from integral images of the Laplacian and its square.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_64F, ksize=1)
    s1 = cv2.integral(lap)
    s2 = cv2.integral(lap * lap)
    h, w = grey.shape
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(np.floor(coords[:, 0] / scale).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / scale).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + tile_l0) / scale).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + tile_l0) / scale).astype(int), 0, h)
    n = np.maximum((x1 - x0) * (y1 - y0), 1)

    def box(s: np.ndarray) -> np.ndarray:
        return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]

    mean = box(s1) / n
    return np.maximum(box(s2) / n - mean * mean, 0).astype(np.float32)


def stain_stats(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean hue (degrees, circular mean), saturation and value (0-1) of the masked pixels."""
    if not mask.any():
        return {}
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[mask].astype(np.float64)
    angle = np.deg2rad(hsv[:, 0] * 2.0)
    hue = float(np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0)
    return {"stain_hue": round(hue, 2), "stain_saturation": round(float(hsv[:, 1].mean() / 255), 4),
            "stain_value": round(float(hsv[:, 2].mean() / 255), 4)}
