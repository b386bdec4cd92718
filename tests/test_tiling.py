import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from histopipe.atomic import atomic_path, clean_partials
from histopipe.errors import SlideError
from histopipe.pyramid import write_pyramid
from histopipe.tiling import (
    TileSource,
    TileStore,
    TilingConfig,
    grid_coords,
    plan_grid,
    tile_slide,
    tissue_fractions,
)
from histopipe.tissue import TissueConfig, detect_tissue


def test_plan_grid_downsamples_from_finer_level():
    # 0.25 µm/px slide, 0.5 µm/px tiles: 512 level-0 px per tile.
    plan = plan_grid((40000, 30000), (1.0, 4.0, 16.0), 0.25, TilingConfig(mpp=0.5, tile_size=256))
    assert plan.tile_size_level0 == 512 and plan.stride_level0 == 512
    assert plan.read_level == 0 and plan.read_size == 512 and plan.needs_resize
    assert (plan.cols, plan.rows) == (40000 // 512, 30000 // 512)


def test_plan_grid_reads_matching_level_without_resize():
    plan = plan_grid((40000, 30000), (1.0, 2.0, 8.0), 0.25, TilingConfig(mpp=0.5, tile_size=256))
    assert plan.read_level == 1 and plan.read_size == 256 and not plan.needs_resize
    # A level within the tolerance of the target counts as matching (20x slide at 0.499 µm/px).
    plan = plan_grid((2220, 2967), (1.0,), 0.499, TilingConfig(mpp=0.5, tile_size=256))
    assert plan.read_level == 0 and plan.read_size == 256


def test_plan_grid_overlap_and_coarse_slide():
    plan = plan_grid((1000, 600), (1.0,), 0.5, TilingConfig(mpp=0.5, tile_size=256, overlap=56))
    assert plan.stride_level0 == 200
    coords = grid_coords(plan)
    assert (plan.cols, plan.rows) == (4, 2)  # floor((1000-256)/200)+1, floor((600-256)/200)+1
    assert coords[:5].tolist() == [[0, 0], [200, 0], [400, 0], [600, 0], [0, 200]]
    assert (coords[:, 0] + 256 <= 1000).all() and (coords[:, 1] + 256 <= 600).all()
    with pytest.raises(SlideError, match="coarser than the target"):
        plan_grid((1000, 600), (1.0,), 1.0, TilingConfig(mpp=0.5))


def test_tissue_fractions_match_mask():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue
    coords = np.array([[0, 0], [400, 0], [200, 0], [800, 800]])
    frac = tissue_fractions(mask, 4.0, coords, 100.0)  # tiles of 25x25 mask px
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.0, 0.0])
    frac = tissue_fractions(mask, 4.0, np.array([[150, 0]]), 100.0)  # straddles the edge at 200
    assert frac[0] == pytest.approx(0.48, abs=0.05)


def test_blank_image_has_no_tissue():
    rng = np.random.default_rng(0)
    blank = np.clip(240 + rng.normal(0, 3, (300, 300, 3)), 0, 255).astype(np.uint8)
    mask, _ = detect_tissue(blank, 8.0, TissueConfig())
    assert not mask.any()


def test_real_slide_tiles_are_plausible(tmp_path, cmu_slide):
    out = tmp_path / "cmu.zarr"
    r = tile_slide(cmu_slide, out, "cmu", qc_dir=tmp_path / "qc")
    assert r.n_grid == 88 and 25 <= r.n_tiles <= 70 and r.status == "ok"
    store = TileStore(out)
    a = store.attrs
    assert a["tile_size"] == 256 and a["target_mpp"] == 0.5 and a["slide_mpp"] == pytest.approx(0.499)
    assert a["tile_size_level0"] == pytest.approx(256 * 0.5 / 0.499) and a["n_tiles"] == len(store)
    assert a["source_size"] == cmu_slide.stat().st_size and a["backend"] == "openslide"
    assert (store.tissue_fraction >= 0.25).all()
    # Kept tiles hold tissue; grid positions that were dropped are mostly glass.
    src = TileSource(out)
    stds = [src[i].std() for i in range(0, len(src), 5)]
    assert np.median(stds) > 25
    assert src[0].shape == (256, 256, 3) and src[0].dtype == np.uint8
    gj = json.loads((tmp_path / "qc" / "cmu.tissue.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    for feat in gj["features"]:
        assert feat["properties"]["classification"]["name"] == "Tissue"
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= 2220).all() and (ring[:, 1] >= 0).all() and (ring[:, 1] <= 2967).all()
        assert ring[0].tolist() == ring[-1].tolist()
    for name in ("cmu.tissue.png", "cmu.grid.png"):
        assert (tmp_path / "qc" / name).stat().st_size > 1000


def test_downsampled_tiles_match_direct_resize(tmp_path, cmu_image):
    import cv2

    img = cmu_image[:2048, :2048]
    path = write_pyramid(tmp_path / "s.tiff", img, 0.25, layout="aperio", levels=(1, 4))
    tile_slide(path, tmp_path / "s.zarr", "s", TilingConfig(mpp=0.5, tile_size=128, min_tissue=0.0))
    src = TileSource(tmp_path / "s.zarr")
    assert src.attrs["read_size"] == 256 and len(src) == 64
    x, y = src.coords[27]
    ref = cv2.resize(img[y : y + 256, x : x + 256], (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(src[27].astype(int) - ref).mean() < 4  # JPEG-compressed source vs original


def test_blank_slide_gives_empty_valid_store(tmp_path, caplog):
    blank = np.full((2048, 2048, 3), 242, np.uint8)
    path = write_pyramid(tmp_path / "blank.tiff", blank, 0.5, layout="generic", levels=(1, 4))
    with caplog.at_level("WARNING"):
        r = tile_slide(path, tmp_path / "blank.zarr", "blank")
    assert r.n_tiles == 0 and r.status == "empty"
    assert "no tissue" in caplog.text
    store = TileStore(tmp_path / "blank.zarr")
    assert store.coords.shape == (0, 2) and store.attrs["status"] == "empty"


def test_atomic_path_failure_keeps_previous_output(tmp_path):
    target = tmp_path / "out.zarr"
    with atomic_path(target) as tmp:
        zarr.open_group(str(tmp), mode="w").create_array("a", data=np.arange(3))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        zarr.open_group(str(tmp), mode="w").create_array("a", data=np.arange(5))
        raise RuntimeError("killed")
    assert zarr.open_group(str(target), mode="r")["a"][:].tolist() == [0, 1, 2]
    assert not list(tmp_path.glob(".*.partial"))


def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "store.zarr"
    code = f"""
import os, signal, numpy as np, zarr
from histopipe.atomic import atomic_path
with atomic_path({str(target)!r}) as tmp:
    g = zarr.open_group(str(tmp), mode="w")
    g.create_array("coords", data=np.zeros((1000, 2), "int64"))
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    assert len(list(tmp_path.glob(".store.zarr.*.partial"))) == 1
    # The next writer of the same target removes the dead writer's leftovers.
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done" and not list(tmp_path.glob("*.partial"))
    assert clean_partials(tmp_path) == 0
