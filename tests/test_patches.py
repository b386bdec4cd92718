"""Heterogeneous patch selection and visual crops, on hand-made maps over the real slide."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histopipe.errors import ConfigError
from histopipe.maps_io import read_map_store, write_map_store
from histopipe.patches import (
    PatchConfig,
    entropy_bits,
    heterogeneous,
    iter_patches,
    patch_geometry,
    patch_labels,
    plan_patches,
    resolve_rule,
    sample_crops,
    select_spread,
    tissue_and_proportions,
    window_areas,
)
from histopipe.regions import largest_square
from histopipe.slides import open_slide


def whole_window(labels2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue fraction and proportions of one window covering the whole raster (cell = 1 px)."""
    h, w = labels2d.shape
    assert h == w
    areas = window_areas(labels2d, 1.0, np.array([[0, 0]]), float(w), int(labels2d.max()) + 1)
    frac, props = tissue_and_proportions(areas, float(w * w))
    return frac[0], props


def cells(spec: list[tuple[int, int]], side: int = 10) -> np.ndarray:
    """A side × side raster filled in row-major order with (label, count) runs."""
    flat = np.concatenate([np.full(n, v, dtype=np.uint16) for v, n in spec])
    assert flat.size == side * side
    return flat.reshape(side, side)


@pytest.mark.parametrize("spec, keep", [
    ([(1, 50), (2, 50)], True),            # 50/50
    ([(1, 80), (2, 20)], True),            # exactly on both bounds
    ([(1, 90), (2, 10)], False),           # 90/10: one type dominates
    ([(1, 100)], False),                   # a single region
    ([(1, 10), (2, 45), (3, 45)], True),   # two types ≥ 20 %, none > 80 %
    ([(1, 15), (2, 15), (3, 70)], False),  # only one type reaches 20 %
    ([(0, 50), (1, 25), (2, 25)], True),   # background excluded: tissue is 50/50
    ([(0, 50), (1, 45), (2, 5)], False),   # background excluded: tissue is 90/10
])
def test_bounds_rule_on_hand_made_maps(spec, keep):
    frac, props = whole_window(cells(spec))
    assert heterogeneous(props, "bounds", lower=0.2, upper=0.8)[0] == keep
    background = dict(spec).get(0, 0)
    assert frac == pytest.approx(1 - background / 100)


def test_entropy_rule_threshold():
    _, p5050 = whole_window(cells([(1, 50), (2, 50)]))
    _, p6040 = whole_window(cells([(1, 60), (2, 40)]))
    _, p8020 = whole_window(cells([(1, 80), (2, 20)]))
    _, p9010 = whole_window(cells([(1, 90), (2, 10)]))
    _, single = whole_window(cells([(1, 100)]))
    assert entropy_bits(p5050)[0] == pytest.approx(1.0)
    assert entropy_bits(p8020)[0] == pytest.approx(0.7219, abs=1e-4)
    assert entropy_bits(single)[0] == 0.0
    assert entropy_bits(np.array([[1 / 3, 1 / 3, 1 / 3]]))[0] == pytest.approx(np.log2(3))
    # Threshold 1 bit: only the even split passes (the threshold itself is inclusive).
    assert heterogeneous(p5050, "entropy", min_entropy=1.0)[0]
    assert not heterogeneous(p6040, "entropy", min_entropy=1.0)[0]
    # Default 0.7 bits: 80/20 passes, 90/10 and a single region do not.
    assert heterogeneous(p8020, "entropy", min_entropy=0.7)[0]
    assert not heterogeneous(p9010, "entropy", min_entropy=0.7)[0]
    assert not heterogeneous(single, "entropy", min_entropy=0.7)[0]
    assert not heterogeneous(np.zeros((1, 3)), "entropy", min_entropy=0.0)[0]  # no tissue never passes


def test_auto_rule_follows_map_source():
    assert resolve_rule("auto", "annotation") == "bounds"
    assert resolve_rule("auto", "kmeans") == "entropy"
    assert resolve_rule("entropy", "annotation") == "entropy"
    with pytest.raises(ConfigError):
        heterogeneous(np.array([[0.5, 0.5]]), "auto")


def test_window_areas_weight_partial_cells_exactly():
    rng = np.random.default_rng(3)
    raster = rng.integers(0, 4, size=(7, 9)).astype(np.uint16)
    cell = 10.0
    coords = np.array([[3, 7], [15, 0], [41, 22], [80, 60]])  # the last one leaves the raster
    size = 27.0
    got = window_areas(raster, cell, coords, size, 4)
    # Brute force: supersample the window on a fine grid of level-0 points.
    fine = 0.25
    for row, (x, y) in zip(got, coords, strict=True):
        xs = x + (np.arange(int(size / fine)) + 0.5) * fine
        ys = y + (np.arange(int(size / fine)) + 0.5) * fine
        c, r = (xs // cell).astype(int), (ys // cell).astype(int)
        inside = (r[:, None] < 7) & (c[None, :] < 9)
        lab = np.where(inside, raster[np.minimum(r, 6)][:, np.minimum(c, 8)], 0)
        expect = np.bincount(lab.ravel(), minlength=4) * (fine / cell) ** 2
        np.testing.assert_allclose(row, expect, atol=1e-9)


def test_config_validation_and_crop_range():
    cfg = PatchConfig(patch_size=512, output_size=256, crop_min=50, crop_max=200)
    assert cfg.size == 256 and cfg.crop_range == (25, 100) and cfg.stored_mpp == pytest.approx(1.0)
    assert PatchConfig(patch_size=128, crop_min=50, crop_max=200).crop_range == (50, 128)
    with pytest.raises(ConfigError, match="lower"):
        PatchConfig(lower=0.9, upper=0.8)
    with pytest.raises(ConfigError, match="rule"):
        PatchConfig(rule="gini")


# --- on the real slide --------------------------------------------------------------------

CELL = 100.0  # level-0 px per map cell (about 50 µm on CMU-1-Small-Region)


@pytest.fixture(scope="module")
def boundary_map(tmp_path_factory, cmu_slide):
    """Annotation map over the real slide: background above y = 1000, type 1 left of
    x = 1100, type 2 right of it."""
    with open_slide(cmu_slide) as s:
        w, h = s.dimensions
    rows, cols = int(np.ceil(h / CELL)), int(np.ceil(w / CELL))
    m = np.zeros((rows, cols), dtype=np.uint16)
    m[10:, :11] = 1
    m[10:, 11:] = 2
    path = tmp_path_factory.mktemp("maps") / "cmu.zarr"
    write_map_store(path, m, CELL, {"slide_id": "cmu", "source": "annotation", "num_labels": 3,
                                    "label_names": ["background", "left", "right"]})
    return read_map_store(path)


def test_plan_keeps_exactly_the_heterogeneous_windows(cmu_slide, boundary_map):
    cfg = PatchConfig(patch_size=256, mpp=0.5, stride=32, min_tissue=0.5, rule="auto", max_patches_per_slide=None)
    with open_slide(cmu_slide) as reader:
        geo = patch_geometry(reader, cfg)
        plan = plan_patches(boundary_map, reader.dimensions, geo, cfg)
    assert plan.rule == "bounds"
    s = geo.tile_size_level0
    assert s == pytest.approx(256 * 0.5 / 0.499)
    # Every candidate, judged analytically from the two straight boundaries.
    xs = np.floor(np.arange(0, int((2220 - s) / (32 * s / 256)) + 1) * (32 * s / 256))
    ys = np.floor(np.arange(0, int((2967 - s) / (32 * s / 256)) + 1) * (32 * s / 256))
    expect = set()
    for y in ys:
        tissue = np.clip((y + s - 1000) / s, 0, 1)
        for x in xs:
            left = np.clip((1100 - x) / s, 0, 1)
            if tissue >= 0.5 and 0.2 - 1e-9 <= left <= 0.8 + 1e-9:
                expect.add((int(x), int(y)))
    got = {(int(x), int(y)) for x, y in plan.coords}
    assert got == expect and len(got) > 20
    assert plan.counts["candidates"] == len(xs) * len(ys)
    assert plan.counts["size_level0"] == pytest.approx(s, abs=1e-3)  # the evaluation's overlap test
    np.testing.assert_allclose(plan.proportions.sum(axis=1), 1.0)
    assert (plan.tissue >= 0.5).all()


def test_cap_spreads_over_the_slide_and_is_seeded(cmu_slide, boundary_map):
    cfg = PatchConfig(patch_size=256, stride=32, rule="bounds", max_patches_per_slide=5, seed=1)
    with open_slide(cmu_slide) as reader:
        geo = patch_geometry(reader, cfg)
        a = plan_patches(boundary_map, reader.dimensions, geo, cfg)
        b = plan_patches(boundary_map, reader.dimensions, geo, cfg)
    assert len(a) == 5
    np.testing.assert_array_equal(a.coords, b.coords)
    s = geo.tile_size_level0
    for i in range(5):  # the boundary strip is long enough for 5 disjoint windows
        for j in range(i + 1, 5):
            assert (np.abs(a.coords[i] - a.coords[j]) >= s).any()
    # More than can be placed apart: filled up with overlapping windows, still no duplicates.
    coords = np.array([[x, 0] for x in range(0, 100, 10)])
    pick = select_spread(coords, 50.0, 4, np.random.default_rng(0))
    assert len(pick) == 4 == len(set(pick.tolist()))


def test_sample_crops_inside_regions_and_side_range():
    labels = np.zeros((256, 256), dtype=np.uint16)
    labels[:, :120] = 1          # 256 × 120 region: full-range crops fit
    labels[:, 120:180] = 2       # 60 px wide strip: sides clipped to ≤ 60
    labels[:30, 180:] = 3        # 30 px high: smaller than crop_min, no crop
    labels[30:, 180:] = 4
    labels[100:110, 10:20] = 5   # a 10 × 10 island inside region 1
    for seed in range(20):
        boxes, crop_labels, valid = sample_crops(labels, 8, (50, 100), np.random.default_rng(seed))
        by_label = {int(v): (tuple(b), ok) for v, b, ok in zip(crop_labels, boxes, valid, strict=True) if v}
        assert list(crop_labels[:5]) == [1, 4, 2, 3, 5]  # largest area first
        assert not valid[5:].any() and not crop_labels[5:].any()
        assert not by_label[3][1] and not by_label[5][1]
        for v in (1, 2, 4):
            (y0, x0, side), ok = by_label[v]
            assert ok and 50 <= side <= 100
            assert (labels[y0 : y0 + side, x0 : x0 + side] == v).all()
        assert by_label[2][0][2] <= 60


def test_patches_on_real_slide_crops_inside_their_regions(cmu_slide, tmp_path):
    """Fragmented random map: image = the slide's pixels, map = nearest-neighbour upsampling,
    every valid crop entirely inside its region, invalid ones where no minimum square fits."""
    rng = np.random.default_rng(7)
    cell = 40.0
    with open_slide(cmu_slide) as s:
        w, h = s.dimensions
    raster = rng.integers(1, 5, size=(int(np.ceil(h / cell)) // 3 + 1, int(np.ceil(w / cell)) // 3 + 1))
    raster = np.kron(raster, np.ones((3, 3), dtype=np.int64))[: int(np.ceil(h / cell)), : int(np.ceil(w / cell))]
    raster[rng.random(raster.shape) < 0.05] = 5  # single-cell specks: too small for crops
    write_map_store(tmp_path / "m.zarr", raster, cell, {"slide_id": "cmu", "source": "kmeans", "num_labels": 6})
    tmap = read_map_store(tmp_path / "m.zarr")
    cfg = PatchConfig(patch_size=512, output_size=256, stride=256, min_entropy=1.0, max_patches_per_slide=6, max_crops=6)
    lo, hi = cfg.crop_range
    assert (lo, hi) == (25, 100)
    n_valid = n_invalid = 0
    with open_slide(cmu_slide) as reader:
        geo = patch_geometry(reader, cfg)
        plan = plan_patches(tmap, reader.dimensions, geo, cfg)
        assert len(plan) == 6 and plan.rule == "entropy"
        for p in iter_patches(reader, tmap, plan, cfg):
            x, y = p.coords
            assert p.image.shape == (256, 256, 3) and p.image.dtype == np.uint8
            # 512 px at 0.5 µm/px ≈ 513 level-0 px of this 0.499 µm/px slide: level 0 read natively
            # (within mpp_tolerance), resized once to 256.
            assert (geo.read_level, geo.read_size) == (0, 512)
            direct = cv2.resize(reader.read_region((x, y), 0, (512, 512)), (256, 256), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(p.image, direct)
            # Map: label of the cell under each pixel centre.
            centre = (np.arange(256) + 0.5) * geo.tile_size_level0 / 256
            expect = raster[((y + centre) // cell).astype(int)][:, ((x + centre) // cell).astype(int)]
            np.testing.assert_array_equal(p.labels, expect)
            present = [v for v in np.unique(p.labels) if v > 0]
            for (y0, x0, side), v, ok in zip(p.crop_boxes, p.crop_labels, p.crop_valid, strict=True):
                if v == 0:
                    assert not ok
                    continue
                assert v in present
                if ok:
                    n_valid += 1
                    assert lo <= side <= hi and y0 + side <= 256 and x0 + side <= 256
                    assert (p.labels[y0 : y0 + side, x0 : x0 + side] == v).all()
                else:
                    n_invalid += 1
                    assert largest_square(p.labels == v) < lo
    assert n_valid >= 6 and n_invalid >= 1


def test_patch_labels_outside_raster_is_background():
    raster = np.full((2, 2), 3, dtype=np.uint16)
    out = patch_labels(raster, 10.0, 10.0, 10.0, 20.0, 4)  # window [10, 30): half outside
    np.testing.assert_array_equal(out, [[3, 3, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
