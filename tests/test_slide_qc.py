"""Slide QC on holdout-like slides made from the real CMU-1-Small-Region: pen ink over tissue
and glass, a blurred half, a slide with nothing but ink."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import zarr

from histopipe.pyramid import write_pyramid
from histopipe.qc import write_tiling_summary
from histopipe.slides import open_slide
from histopipe.tiling import TilingConfig, tile_slide
from histopipe.tissue import TissueConfig, tissue_mask

MPP = 0.499
# Ink strokes as (colour RGB, (x0, y0), (x1, y1), width px): across tissue and onto the glass.
STROKES = [((40, 70, 190), (100, 300), (2100, 900), 110),  # blue
           ((40, 150, 70), (300, 2700), (1900, 1500), 110),  # green
           ((25, 25, 30), (1600, 200), (1700, 2800), 90)]  # black


def _paint(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, painted = image.copy(), np.zeros(image.shape[:2], np.uint8)
    for rgb, a, b, w in STROKES:
        cv2.line(out, a, b, rgb, w)
        cv2.line(painted, a, b, 1, w)
    return out, painted.astype(bool)


def _mask(path) -> tuple[np.ndarray, np.ndarray, float]:
    with open_slide(path, "tiffslide") as r:
        tm, _ = tissue_mask(r, TissueConfig())
    return tm.mask, tm.ink, tm.scale


def test_ink_is_excluded_and_the_tissue_kept(tmp_path, cmu_image):
    inked, painted = _paint(cmu_image)
    clean_path = write_pyramid(tmp_path / "clean.tiff", cmu_image, MPP, levels=(1, 4, 16))
    inked_path = write_pyramid(tmp_path / "inked.tiff", inked, MPP, levels=(1, 4, 16))
    clean, clean_ink, scale = _mask(clean_path)
    mask, ink, _ = _mask(inked_path)
    assert not clean_ink.any()
    h, w = mask.shape
    painted_small = cv2.resize(painted.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
    # Every stroke found; little beyond the strokes and their 16 µm halo.
    assert ink[painted_small].mean() > 0.97
    near = cv2.dilate(painted_small.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert not ink[~near].any()
    # No ink in the tissue mask; the tissue away from the strokes is kept as it was.
    assert not (mask & ink).any()
    away = ~near
    agree = (mask[away] == clean[away]).mean()
    assert agree > 0.98, agree
    assert mask[away].sum() > 0.95 * clean[away].sum()

    # Through tiling: the ink is reported as area, tiles on the strokes are gone, the others stay.
    cfg = TilingConfig(mpp=0.5, tile_size=128)
    r_clean = tile_slide(clean_path, tmp_path / "clean.zarr", "clean", cfg)
    r_ink = tile_slide(inked_path, tmp_path / "inked.zarr", "inked", cfg)
    a = dict(zarr.open_group(str(tmp_path / "inked.zarr"), mode="r").attrs)
    painted_mm2 = painted.sum() * MPP**2 / 1e6
    assert painted_mm2 < a["ink_area_mm2"] < 1.6 * painted_mm2
    clean_tiles = {tuple(c) for c in zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")["coords"][:]}
    ink_tiles = {tuple(c) for c in zarr.open_group(str(tmp_path / "inked.zarr"), mode="r")["coords"][:]}
    side = 128 * 0.5 / MPP

    def touches(x, y) -> bool:
        return bool(painted[int(y):int(y + side), int(x):int(x + side)].any())

    # Tiles lost are those on the strokes; a tile at the min_tissue border may come or go
    # as the Otsu threshold moves a little without the ink (at most 2 % of the tiles).
    border = max(1, round(0.02 * len(clean_tiles)))
    assert len(ink_tiles - clean_tiles) <= border
    assert sum(not touches(x, y) for x, y in clean_tiles - ink_tiles) <= border
    # A kept tile has at least min_tissue of tissue besides the ink on it.
    ink_share = [painted[int(y):int(y + side), int(x):int(x + side)].mean() for x, y in ink_tiles]
    assert max(ink_share) <= 1 - cfg.min_tissue + 0.05, max(ink_share)
    untouched = [(x, y) for x, y in clean_tiles if not touches(x, y)]
    assert len(set(untouched) - ink_tiles) <= border
    assert r_ink.n_tiles < r_clean.n_tiles and len(untouched) > 0.3 * r_clean.n_tiles


def test_blurred_half_is_flagged_or_dropped(tmp_path, cmu_image):
    img = cmu_image.copy()
    half = img.shape[1] // 2
    img[:, half:] = cv2.GaussianBlur(cmu_image, (0, 0), 6)[:, half:]  # 3 µm out of focus
    path = write_pyramid(tmp_path / "blur.tiff", img, MPP, levels=(1, 4, 16))
    r = tile_slide(path, tmp_path / "flag.zarr", "blur", TilingConfig())
    g = zarr.open_group(str(tmp_path / "flag.zarr"), mode="r")
    coords, sharp = g["coords"][:], g["sharpness"][:]
    side = 256 * 0.5 / MPP
    left = coords[:, 0] + side <= half
    right = coords[:, 0] >= half
    assert left.sum() >= 5 and right.sum() >= 5
    blurry = sharp < TilingConfig().min_sharpness
    assert not blurry[left].any(), sharp[left]
    assert blurry[right].all(), sharp[right]
    assert g.attrs["n_blurry"] == int(blurry.sum()) and g.attrs["blur_action"] == "flag"
    # Flagging keeps every tile; dropping keeps the sharp ones only.
    dropped = tile_slide(path, tmp_path / "drop.zarr", "blur", TilingConfig(blur_action="drop"))
    assert dropped.n_tiles == r.n_tiles - int(blurry.sum())
    assert (zarr.open_group(str(tmp_path / "drop.zarr"), mode="r")["sharpness"][:] >= 500).all()


def test_qc_that_removes_all_tissue_gives_an_empty_store_with_the_reason(tmp_path, cmu_image):
    # All blurred, blurry tiles dropped.
    blurred = cv2.GaussianBlur(cmu_image, (0, 0), 6)
    path = write_pyramid(tmp_path / "blur.tiff", blurred, MPP, levels=(1, 4, 16))
    r = tile_slide(path, tmp_path / "b.zarr", "b", TilingConfig(blur_action="drop"))
    a = dict(zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs)
    assert r.n_tiles == 0 and a["status"] == "empty" and a["reason"].startswith("all ") and "blurry" in a["reason"]
    # Glass with a pen mark and no tissue.
    glass = np.full_like(cmu_image, 236)
    inked, _ = _paint(glass)
    path = write_pyramid(tmp_path / "ink.tiff", inked, MPP, levels=(1, 4, 16))
    r = tile_slide(path, tmp_path / "i.zarr", "i", TilingConfig())
    a = dict(zarr.open_group(str(tmp_path / "i.zarr"), mode="r").attrs)
    assert r.n_tiles == 0 and a["status"] == "empty" and "pen ink" in a["reason"] and a["ink_area_mm2"] > 0.1
    # The tiling summary names both, with their QC figures and reasons.
    write_tiling_summary([tmp_path / "b.zarr", tmp_path / "i.zarr"], tmp_path / "failed.tsv", tmp_path / "summary.tsv")
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"), strict=True)) for line in lines[1:]]
    assert [(x["slide_id"], x["status"], x["n_tiles"]) for x in rows] == [("b", "empty", "0"), ("i", "empty", "0")]
    assert int(rows[0]["n_blurry"]) > 30 and "blurry" in rows[0]["reason"]
    assert float(rows[1]["ink_area_mm2"]) == a["ink_area_mm2"] and "pen ink" in rows[1]["reason"]


def test_real_slide_tile_count_unchanged(cmu_slide, tmp_path):
    """CMU-1-Small-Region: no ink, no blurry tile, and the tile count of the tiling without
    the QC (43 tiles of 256 px at 0.5 µm/px), within a few percent."""
    r = tile_slide(cmu_slide, tmp_path / "cmu.zarr", "cmu")
    a = dict(zarr.open_group(str(tmp_path / "cmu.zarr"), mode="r").attrs)
    assert 41 <= r.n_tiles <= 45 and a["ink_area_mm2"] == 0 and a["n_blurry"] == 0
    assert 280 < a["stain_hue"] < 340 and a["stain_saturation"] == pytest.approx(0.316, abs=0.02)
