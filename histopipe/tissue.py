"""Tissue detection on a low-resolution view of a slide, QC overlay and GeoJSON polygons."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import cv2
import numpy as np
from skimage import filters, morphology

from histopipe.slides import SlideReader


@dataclass(frozen=True)
class TissueConfig:
    """Parameters of the tissue mask (see workflow/schemas/config.schema.yaml, ``tissue``)."""

    mask_mpp: float = 8.0
    method: str = "otsu_saturation"
    min_saturation: float = 0.05
    max_value: float = 0.92
    closing_um: float = 32.0
    opening_um: float = 16.0
    min_object_um2: float = 20000.0
    max_hole_um2: float = 10000.0
    ink_colors: tuple[str, ...] = ("blue", "green", "black")
    ink_min_saturation: float = 0.3
    ink_black_max_value: float = 0.2


@dataclass
class TissueMask:
    """Boolean tissue mask ``(h, w)`` at ``mpp`` µm/px; ``scale`` level-0 px per mask px;
    ``ink`` the pen-ink pixels excluded from it (same shape)."""

    mask: np.ndarray
    mpp: float
    scale: float
    threshold: float
    ink: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def ink_fraction(self) -> float:
        return float(self.ink.mean()) if self.ink is not None and self.ink.size else 0.0


def read_thumbnail(reader: SlideReader, target_mpp: float, max_block: int = 4096) -> tuple[np.ndarray, float]:
    """The whole slide at (about) ``target_mpp`` µm/px as uint8 ``(h, w, 3)``.

    Reads the coarsest pyramid level that is at least as fine as the target and resizes it
    (area interpolation) block by block, so that a slide without a pyramid never needs its
    full level 0 in memory. Returns the image and its level-0 px per image px.
    """
    w0, h0 = reader.dimensions
    scale = max(target_mpp / reader.mpp, 1.0)
    out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    scale_x, scale_y = w0 / out_w, h0 / out_h
    level = reader.best_level_for_downsample(scale, tolerance=0.01)
    ds = reader.level_downsamples[level]
    lw, lh = reader.level_dimensions[level]
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    # Blocks in output pixels; each is read at `level` and resized once.
    step = max(1, int(max_block * ds / scale_x))
    for oy in range(0, out_h, step):
        for ox in range(0, out_w, step):
            bw, bh = min(step, out_w - ox), min(step, out_h - oy)
            x0, y0 = ox * scale_x, oy * scale_y
            rw = min(lw - int(x0 / ds), max(1, math.ceil(bw * scale_x / ds)))
            rh = min(lh - int(y0 / ds), max(1, math.ceil(bh * scale_y / ds)))
            block = reader.read_region((int(x0), int(y0)), level, (max(rw, 1), max(rh, 1)))
            if block.shape[:2] != (bh, bw):
                block = cv2.resize(block, (bw, bh), interpolation=cv2.INTER_AREA)
            out[oy : oy + bh, ox : ox + bw] = block
    return out, float((scale_x + scale_y) / 2)


def detect_tissue(image: np.ndarray, mpp: float, cfg: TissueConfig, ink: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image at ``mpp`` µm/px; returns ``(mask bool, threshold)``.

    Otsu on the HSV saturation (tissue is stained, glass and background are grey/white), with
    a floor so that a blank slide yields no tissue, then closing, opening, small-object and
    hole removal with sizes given in µm / µm². Pen ink (``ink``, else detected with the
    config's ink rules, see histopipe.slide_qc) is left out of the threshold and of the mask.
    """
    if ink is None:
        ink = _ink(image, mpp, cfg)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    if cfg.method == "otsu_saturation":
        signal = hsv[..., 1].astype(np.float32) / 255.0
    else:
        signal = 1.0 - cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    # The threshold is chosen on the pixels that are not ink.
    sample = signal[~ink] if ink.any() else signal
    if sample.size == 0 or float(sample.max() - sample.min()) < 1e-6:
        threshold = cfg.min_saturation
    else:
        threshold = max(float(filters.threshold_otsu(sample)), cfg.min_saturation)
    value = hsv[..., 2].astype(np.float32) / 255.0
    mask = signal > threshold
    # Bright, weakly stained pixels are glass even above a low Otsu threshold.
    mask &= ~((value > cfg.max_value) & (signal < 2 * threshold))
    close_r = int(round(cfg.closing_um / mpp))
    open_r = int(round(cfg.opening_um / mpp))
    if close_r > 0:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(close_r)).astype(bool)
    if open_r > 0:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(open_r)).astype(bool)
    px_area = mpp * mpp
    min_obj = int(cfg.min_object_um2 / px_area)
    max_hole = int(cfg.max_hole_um2 / px_area)
    if min_obj > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_obj) if _has_max_size() else morphology.remove_small_objects(mask, min_obj)
    if max_hole > 0:
        mask = morphology.remove_small_holes(mask, max_size=max_hole) if _has_max_size() else morphology.remove_small_holes(mask, max_hole)
    return (mask & ~ink).astype(bool), threshold


def _ink(image: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    if not cfg.ink_colors:
        return np.zeros(image.shape[:2], dtype=bool)
    from histopipe.slide_qc import ink_mask

    return ink_mask(image, mpp, tuple(cfg.ink_colors), cfg.ink_min_saturation, cfg.ink_black_max_value)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _has_max_size() -> bool:
    # scikit-image 0.26 renamed min_size/area_threshold to max_size.
    import inspect

    return "max_size" in inspect.signature(morphology.remove_small_objects).parameters


def tissue_mask(reader: SlideReader, cfg: TissueConfig) -> tuple[TissueMask, np.ndarray]:
    """Detect tissue on ``reader``; returns the mask and the thumbnail it was computed on."""
    thumb, scale = read_thumbnail(reader, cfg.mask_mpp)
    mpp = reader.mpp * scale
    ink = _ink(thumb, mpp, cfg)
    mask, threshold = detect_tissue(thumb, mpp, cfg, ink)
    return TissueMask(mask, mpp, scale, threshold, ink), thumb


def mask_to_polygons(mask: np.ndarray, scale: float) -> list[list[list[list[float]]]]:
    """Polygons (GeoJSON ring lists: exterior then holes) of a mask, in level-0 px."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3:
            continue  # holes are attached to their parent below
        rings = [_ring(contour, scale)]
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(_ring(contours[child], scale))
            child = hierarchy[child][0]
        polygons.append(rings)
    return polygons


def _ring(contour: np.ndarray, scale: float) -> list[list[float]]:
    # Pixel centres → level-0 coordinates of the pixel corners' centre line.
    pts = (contour[:, 0, :].astype(np.float64) + 0.5) * scale
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in pts]
    ring.append(ring[0])
    return ring


def geojson_features(polygons: list, name: str, color: tuple[int, int, int], extra: dict | None = None) -> list[dict]:
    """QuPath-compatible GeoJSON features (one annotation per polygon)."""
    feats = []
    for rings in polygons:
        props = {"objectType": "annotation", "classification": {"name": name, "color": list(color)}}
        if extra:
            props.update(extra)
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": props})
    return feats


def geojson_text(features: list[dict]) -> str:
    return json.dumps({"type": "FeatureCollection", "features": features})


def overlay(thumb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 200, 0), alpha: float = 0.35) -> np.ndarray:
    """Thumbnail with the mask tinted and its outline drawn (QC image)."""
    out = thumb.copy()
    tint = np.array(color, dtype=np.float32)
    out[mask] = (out[mask].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out
