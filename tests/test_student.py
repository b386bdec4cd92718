"""Student classifier: learns k-means types from pixels, held-out agreement, save/load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histopipe.clustering import ClusterConfig, fit
from histopipe.pyramid import write_pyramid
from histopipe.student import StudentConfig, StudentModel, split_slides, student_map, train_student
from histopipe.tissuemap import TileGrid, kmeans_map, read_map, write_map
from tests.helpers import run_cli
from tests.synthetic_stores import grid_coords, write_embedding_store, write_tile_store

COLOURS = np.array([[200, 60, 120], [90, 60, 170], [240, 200, 210]], np.uint8)
CFG = StudentConfig(architecture="test_efficientnet_gn", tile_size=32, epochs=2, batch_size=16, lr=5e-3,
                    num_workers=0, val_fraction=0.5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One slide file of 64 px blocks in three colours, seen as two slides (left/right half);
    embeddings are the block colours, so the k-means types are learnable from pixels."""
    root = tmp_path_factory.mktemp("student")
    rng = np.random.default_rng(0)
    blocks = rng.integers(3, size=(8, 16))
    image = np.repeat(np.repeat(COLOURS[blocks], 64, 0), 64, 1).astype(np.float32)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    write_pyramid(root / "slide.tiff", image, 0.5, levels=(1,))
    pairs, embeddings = [], []
    for name, c0 in (("left", 0), ("right", 8)):
        keep = np.zeros((8, 16), bool)
        keep[:, c0 : c0 + 8] = True
        coords = grid_coords(8, 16, 64, keep=keep)
        tiles = write_tile_store(root / f"{name}.tiles.zarr", coords, slide_id=name, width=1024, height=512,
                                 tile_size=64, slide_path=root / "slide.tiff")
        feats = COLOURS[blocks[keep]].astype(np.float32) + rng.normal(0, 3, (keep.sum(), 3)).astype(np.float32)
        embeddings.append(write_embedding_store(root / f"{name}.emb.zarr", feats, coords, slide_id=name))
        pairs.append((root / f"{name}.map.zarr", tiles))
    model = fit(embeddings, ClusterConfig(k=3, levels=(3, 2), normalize="none"))
    for (map_path, tiles), emb in zip(pairs, embeddings, strict=True):
        write_map(map_path, kmeans_map(model, emb, tiles))
    return root, pairs


@pytest.fixture(scope="module")
def trained(cohort):
    return train_student(cohort[1], CFG, seed=0)


def test_split_slides_by_whole_slides():
    ids = [f"s{i}" for i in range(10)]
    train, val = split_slides(ids, 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert split_slides(ids, 0.2, seed=1) == (train, val)
    assert split_slides(["a", "b"], 0.01, 0)[1] and split_slides(["a"], 0.5, 0) == (["a"], [])


def test_student_agrees_with_kmeans_on_held_out_slide(trained):
    student, metrics = trained
    assert metrics["val_slides"] == 1 and metrics["train_slides"] == 1 and metrics["val_tiles"] == 64
    assert metrics["agreement"] >= 0.9
    per_level = metrics["agreement_per_level"]
    assert list(per_level) == ["3", "2"]
    assert per_level["2"] >= per_level["3"]  # agreeing on a fine type implies agreeing on its coarse type
    assert student.meta["val_slides"] != student.meta["train_slides"]


def test_saved_student_predicts_the_same_map(trained, cohort, tmp_path):
    student, _ = trained
    student.save(tmp_path / "student")
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == ["metrics.json", "model.safetensors", "student.json"]
    loaded = StudentModel.load(tmp_path / "student")
    tiles = cohort[1][1][1]
    a, b = student.predict_store(tiles), loaded.predict_store(tiles)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 2)
    luts = np.asarray(student.meta["level_luts"])
    np.testing.assert_array_equal(a[:, 1] + 1, luts[1][a[:, 0] + 1])
    tmap = student_map(loaded, tiles)
    assert tmap.attrs["assigned_by"] == "student" and tmap.attrs["levels"] == [3, 2]
    kmeans = read_map(cohort[1][1][0])
    assert tmap.labels.shape == kmeans.labels.shape
    grid = TileGrid.from_tile_store(tiles)
    np.testing.assert_array_equal(tmap.tile_labels(grid), a + 1)


@pytest.mark.slow
def test_cli_train_and_predict(cohort, tmp_path):
    root, pairs = cohort
    (tmp_path / "pairs.tsv").write_text("".join(f"{m}\t{t}\n" for m, t in pairs))
    cfg = {"clustering": {"student": {"architecture": "test_efficientnet_gn", "tile_size": 32, "batch_size": 16,
                                      "lr": 0.005, "num_workers": 0, "val_fraction": 0.5}}}
    r = run_cli("train-student", "--list", tmp_path / "pairs.tsv", "--out", tmp_path / "student",
                "--config-json", json.dumps(cfg), "--epochs", 1)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert 0 <= metrics["agreement"] <= 1 and metrics["val_tiles"] == 64
    r = run_cli("predict-tissue-types", tmp_path / "student", pairs[1][1], "--out", tmp_path / "p.zarr",
                "--geojson", tmp_path / "p.geojson")
    assert r.returncode == 0, r.stderr
    assert read_map(tmp_path / "p.zarr").labels.shape == (2, 8, 16)
    assert json.loads((tmp_path / "p.geojson").read_text())["type"] == "FeatureCollection"
