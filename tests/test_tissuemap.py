"""Tissue-type maps on a real tile grid: raster geometry, GeoJSON, PNG overlay, montage, CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import shapely
import zarr
from shapely.geometry import box, shape

from histopipe.clustering import ClusterModel, ward_level_luts
from histopipe.montage import LABEL_WIDTH, cohort_montage
from histopipe.tiling import TileSource, TilingConfig, tile_slide
from histopipe.tissuemap import (
    TileGrid,
    TissueMap,
    kmeans_map,
    map_geojson,
    overlay_png,
    read_map,
    write_map,
)
from tests.helpers import run_cli
from tests.synthetic_stores import write_embedding_store

W, H = 2220, 2967  # CMU-1-Small-Region level 0


@pytest.fixture(scope="module")
def tiles(cmu_slide, tmp_path_factory):
    """A real tile store: 64 px tiles at 2 µm/px (≈ 256 level-0 px)."""
    out = tmp_path_factory.mktemp("tiles") / "cmu.zarr"
    tile_slide(cmu_slide, out, "cmu", TilingConfig(mpp=2.0, tile_size=64, min_tissue=0.1))
    return out


@pytest.fixture(scope="module")
def embeddings(tiles, tmp_path_factory):
    """Tile features = mean and std of the tile's RGB, so types follow the pixels."""
    source = TileSource(tiles)
    px = source.read_batch(range(len(source))).reshape(len(source), -1, 3).astype(np.float32)
    feats = np.concatenate([px.mean(1), px.std(1)], axis=1) / 255
    return write_embedding_store(tmp_path_factory.mktemp("emb") / "cmu.zarr", feats, source.coords, slide_id="cmu")


@pytest.fixture(scope="module")
def model(embeddings) -> ClusterModel:
    feats = zarr.open_group(embeddings, mode="r")["features"][:]
    rng = np.random.default_rng(0)
    centroids = feats[rng.choice(len(feats), 4, replace=False)]
    luts = ward_level_luts(centroids, np.ones(4), [4, 2])
    return ClusterModel(np.ascontiguousarray(centroids), luts, {"format": 1, "levels": [4, 2], "normalize": "none", "encoder": "synthetic"})


@pytest.fixture(scope="module")
def tmap(model, embeddings, tiles) -> TissueMap:
    return kmeans_map(model, embeddings, tiles)


def test_map_raster_matches_tile_grid(tmap, model, embeddings, tiles, tmp_path):
    grid = TileGrid.from_tile_store(tiles)
    cell = grid.cell_level0
    assert tmap.labels.shape == (2, math.ceil(H / cell), math.ceil(W / cell))
    assert tmap.labels.dtype == np.uint16
    types = model.assign_store(embeddings)
    cols, rows = (grid.coords / cell).round().astype(int).T
    # each tile's cell holds its type + 1 at every level, and its top-left lies in that cell
    # (tile coords are level-0 px rounded from multiples of the fractional stride: ±0.5 px)
    np.testing.assert_array_equal(tmap.labels[:, rows, cols].T, types + 1)
    assert np.all(np.abs(grid.coords - np.stack([cols, rows], 1) * cell) <= 0.5)
    assert (tmap.labels[0] > 0).sum() == len(grid.coords)  # cells without a tile are background
    write_map(tmp_path / "m.zarr", tmap)
    back = read_map(tmp_path / "m.zarr")
    np.testing.assert_array_equal(back.labels, tmap.labels)
    a = back.attrs
    assert (a["levels"], a["source"], a["slide_id"], a["num_labels"]) == ([4, 2], "kmeans", "cmu", 5)
    assert a["cell_level0"] == pytest.approx(cell) and len(a["label_names"]) == 5 and a["label_names"][0] == "background"
    assert np.array(a["level_luts"]).shape == (2, 5)
    np.testing.assert_array_equal(back.tile_labels(grid), types + 1)
    # the patch stage's reader accepts it, level LUTs included
    from histopipe.maps_io import read_map_store

    store = read_map_store(tmp_path / "m.zarr")
    np.testing.assert_array_equal(store.level_luts[1][back.labels[0]], back.labels[1])


def test_geojson_parses_and_polygons_lie_within_slide(tmap, tmp_path):
    from histopipe.tissuemap import write_geojson

    write_geojson(tmp_path / "m.geojson", tmap)
    data = json.loads((tmp_path / "m.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    slide_box = box(0, 0, W, H)
    cell = tmap.cell_level0
    present = sorted(set(np.unique(tmap.labels[0])) - {0})
    assert [f["properties"]["label"] for f in data["features"]] == present
    for feat in data["features"]:
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == props["name"] and len(props["classification"]["color"]) == 3
        geom = shape(feat["geometry"])
        assert geom.is_valid and slide_box.buffer(1e-6).covers(geom)
        rr, cc = np.nonzero(tmap.labels[0] == props["label"])
        cells = shapely.union_all([box(c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r, c in zip(rr, cc, strict=True)])
        # equal up to the 0.01 px coordinate precision of the file
        assert geom.symmetric_difference(cells.intersection(slide_box)).area < 0.01 * cells.length


def test_geojson_keeps_holes_and_clips_edge_cells():
    labels = np.zeros((1, 5, 5), np.uint16)
    labels[0, 1:4, 1:4] = 1
    labels[0, 2, 2] = 0  # a hole
    labels[0, 4, 4] = 2  # a cell reaching past the slide's edge
    tmap = TissueMap(labels, {"levels": [2], "cell_level0": 100.0, "level0_width": 450, "level0_height": 460,
                              "label_names": ["background", "a", "b"], "slide_id": "x"})
    feats = map_geojson(tmap)["features"]
    ring = shape(feats[0]["geometry"])
    assert ring.area == pytest.approx(8 * 100 * 100) and len(list(ring.interiors)) == 1
    corner = shape(feats[1]["geometry"])
    assert corner.bounds == pytest.approx((400, 400, 450, 460))


def test_png_overlay_colours_tissue_cells_only(tmap, cmu_slide, tmp_path):
    from histopipe.tissuemap import slide_thumbnail, upsample_labels

    image = overlay_png(tmp_path / "o.png", tmap, cmu_slide, max_side=512)
    assert max(image.shape[:2]) == 512
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(tmp_path / "o.png")), cv2.COLOR_BGR2RGB), image)
    thumb = slide_thumbnail(cmu_slide, 512)
    labels = upsample_labels(tmap.labels[0], tmap.cell_level0, (W, H), (image.shape[1], image.shape[0]))
    diff = np.abs(image.astype(int) - thumb).sum(-1)
    assert np.all(diff[labels == 0] == 0)
    assert (diff[labels > 0] > 0).mean() > 0.95


def test_montage_shows_tiles_of_each_type(tmap, tiles, tmp_path):
    write_map(tmp_path / "m.zarr", tmap)
    image = cohort_montage(tmp_path / "montage.png", [(tmp_path / "m.zarr", tiles)], per_type=3, thumb=32)
    assert image.shape == (4 * 32, LABEL_WIDTH + 3 * 32, 3)
    assert cv2.imread(str(tmp_path / "montage.png")).shape == image.shape
    # the first example of each present type is a tile of that type
    from histopipe.montage import pick_examples

    chosen, _ = pick_examples([(tmp_path / "m.zarr", tiles)], 3)
    source, grid = TileSource(tiles), TileGrid.from_tile_store(tiles)
    labels = tmap.tile_labels(grid)[:, 0]
    for lab, picks in chosen.items():
        assert all(labels[t] == lab for _, t in picks) and len(picks) == min(3, (labels == lab).sum())
        expect = cv2.resize(source[picks[0][1]], (32, 32), interpolation=cv2.INTER_AREA)
        row = image[(lab - 1) * 32 : lab * 32, LABEL_WIDTH : LABEL_WIDTH + 32]
        np.testing.assert_array_equal(row, expect)


def test_failed_slide_gives_empty_map(tmp_path):
    from histopipe.tiling import TilingConfig, write_failed_store

    write_failed_store(tmp_path / "t.zarr", "bad", tmp_path / "bad.svs", TilingConfig(), "corrupt")
    write_embedding_store(tmp_path / "e.zarr", np.zeros((0, 6), np.float32), np.zeros((0, 2)), slide_id="bad")
    model = ClusterModel(np.eye(2, 6, dtype=np.float32), np.array([[0, 1], [0, 0]], np.int32),
                         {"format": 1, "levels": [2, 1], "normalize": "none", "encoder": "synthetic"})
    tmap = kmeans_map(model, tmp_path / "e.zarr", tmp_path / "t.zarr")
    assert tmap.labels.shape == (2, 0, 0)
    assert map_geojson(tmap)["features"] == []
    assert overlay_png(tmp_path / "o.png", tmap, tmp_path / "bad.svs").shape == (64, 64, 3)


@pytest.mark.slow
def test_cli_fit_assign_montage(embeddings, tiles, cmu_slide, tmp_path):
    # a second "slide": the same tiles shifted into a new store, to fit on two stores
    feats = zarr.open_group(embeddings, mode="r")["features"][:]
    coords = TileGrid.from_tile_store(tiles).coords
    write_embedding_store(tmp_path / "b.emb.zarr", feats[::-1].copy(), coords, slide_id="b")
    (tmp_path / "list.txt").write_text(f"{embeddings}\n{tmp_path / 'b.emb.zarr'}\n")
    r = run_cli("fit-clusters", "--list", tmp_path / "list.txt", "--out", tmp_path / "model", "--k", 6,
                "--levels", "6,3", "--per-slide-cap", 50, "--total-cap", 80)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["n_sampled"] == 80 and meta["levels"] == [6, 3] and meta["encoder"] == "synthetic"
    r = run_cli("assign-clusters", tmp_path / "model", embeddings, tiles, "--out", tmp_path / "cmu.map.zarr",
                "--png", tmp_path / "cmu.png", "--geojson", tmp_path / "cmu.geojson", "--max-side", 256)
    assert r.returncode == 0, r.stderr
    tmap = read_map(tmp_path / "cmu.map.zarr")
    assert tmap.labels.shape[0] == 2 and tmap.attrs["cluster_model"] == str(tmp_path / "model")
    assert max(cv2.imread(str(tmp_path / "cmu.png")).shape[:2]) == 256
    assert json.loads((tmp_path / "cmu.geojson").read_text())["features"]
    r = run_cli("cluster-montage", "--maps", tmp_path / "cmu.map.zarr", "--tiles", tiles, "--out", tmp_path / "montage.png",
                "--per-type", 2, "--thumb", 24)
    assert r.returncode == 0, r.stderr
    assert cv2.imread(str(tmp_path / "montage.png")).shape[0] == 6 * 24
    # too few sampled tiles for k: one line naming the problem, exit 2, no traceback
    r = run_cli("fit-clusters", embeddings, "--out", tmp_path / "m2", "--k", 500, "--levels", "500")
    assert r.returncode == 2 and "at least k = 500" in r.stderr and "Traceback" not in r.stderr
