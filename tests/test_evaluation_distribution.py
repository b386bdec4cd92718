"""Distribution metrics end to end: image sets from stores, features, FD and precision/recall."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from histopipe.errors import HistopipeError
from histopipe.evaluation.distribution import (
    TSV_COLUMNS,
    distribution_rows,
    evaluate_distribution,
)
from histopipe.evaluation.features import (
    ImageSet,
    embed_set,
    patch_footprints,
    synthetic_footprints,
)
from histopipe.evaluation.frechet import frechet_distance_stats, gaussian_stats
from histopipe.evaluation.outputs import write_json, write_tsv
from histopipe.evaluation.settings import EvaluationSettings
from tests.evaluation_helpers import (
    TimmAdapter,
    one_thread,
    run_cli,
    tiny_factory,
    toy_patches,
    write_patch_store,
    write_synthetic_store,
)

COLOURS_OFF = {0: (200, 230, 200), 1: (120, 200, 120), 2: (30, 110, 60)}  # a "bad generator"


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


_SPLIT = np.repeat([0, 1, 2], [16, 4, 20]).astype(np.uint8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    images, maps = toy_patches(40, 32, rng)
    split = _SPLIT
    real = write_patch_store(root / "patches.zarr", images, maps, split)
    # "Perfect" synthesis: exactly the held-out real patches; and one in the wrong colours.
    same = write_synthetic_store(root / "same.zarr", images[split == 2], maps[split == 2], "map_raw_crops")
    off_images, off_maps = toy_patches(20, 32, np.random.default_rng(1), COLOURS_OFF)
    off = write_synthetic_store(root / "off.zarr", off_images, off_maps, "unconditional")
    return real, same, off, images, maps


def test_image_sets_select_splits_and_seeded_subsets(stores):
    real, same, _, images, _ = stores
    test = ImageSet.open(real, split="test")
    assert len(test) == 20 and test.n_available == 20 and test.indices[0] == 20
    a = ImageSet.open(real, split="all", max_samples=10, seed=3)
    b = ImageSet.open(real, split="all", max_samples=10, seed=3)
    assert len(a) == 10 and np.array_equal(a.indices, b.indices)
    assert np.all(np.diff(a.indices) > 0) and a.n_available == 40
    got = np.concatenate(list(a.batches(3)))
    assert np.array_equal(got, images[a.indices])
    with pytest.raises(HistopipeError, match="no `split` array"):
        ImageSet.open(same, split="test")
    with pytest.raises(HistopipeError, match="not found"):
        ImageSet.open(real.parent / "missing.zarr")


def test_streamed_features_equal_one_batch(stores):
    real, _, _, _, _ = stores
    enc = TimmAdapter()
    test = ImageSet.open(real, split="test")
    small, kept = embed_set(enc, test, batch_size=3, keep=7, seed=0)
    big, _ = embed_set(enc, test, batch_size=64)
    np.testing.assert_allclose(small.stats().mean, big.stats().mean, rtol=1e-5, atol=1e-6)
    assert kept.shape == (7, enc.dim) and kept.dtype == np.float32
    all_feats = enc.embed(np.concatenate(list(test.batches(64)))).numpy()
    # The kept rows are 7 distinct rows of the set (a seeded random choice).
    matches = [np.flatnonzero(np.abs(all_feats - row).max(1) < 1e-4) for row in kept]
    assert all(len(m) >= 1 for m in matches) and len({int(m[0]) for m in matches}) == 7


def test_identical_synthetic_set_scores_perfectly_and_a_wrong_one_does_not(stores, tmp_path):
    real, same, off, _, _ = stores
    settings = EvaluationSettings(encoders=("tiny_a", "tiny_b"), device="cpu", knn_k=3,
                                  manifold_samples=15, batch_size=8)
    real_set = ImageSet.open(real, split="test")
    good = evaluate_distribution(real_set, ImageSet.open(same), settings, encoder_factory=tiny_factory)
    bad = evaluate_distribution(real_set, ImageSet.open(off), settings, encoder_factory=tiny_factory)
    assert good["variant"] == "map_raw_crops" and bad["variant"] == "unconditional"
    for name in ("tiny_a", "tiny_b"):
        g, b = good["encoders"][name], bad["encoders"][name]
        assert g["fd"] < 1e-6 * b["fd"]
        assert g["precision"] == g["recall"] == g["coverage"] == 1.0
        assert b["precision"] < 0.5 and b["coverage"] < 0.5
        assert (g["n_real"], g["n_synthetic"], g["n_manifold_real"]) == (20, 20, 15)
    assert bad["encoders"]["tiny_a"]["fd"] != bad["encoders"]["tiny_b"]["fd"]
    assert good["real"]["split"] == "test" and good["synthetic"]["attrs"]["variant"] == "map_raw_crops"
    assert good["seed"] == 0 and good["knn_k"] == 3

    # The files the CLI writes: JSON (no NaN) and one TSV row per encoder.
    write_json(tmp_path / "m.json", bad)
    assert json.loads((tmp_path / "m.json").read_text())["encoders"]["tiny_b"]["dim"] == 64
    write_tsv(tmp_path / "m.tsv", distribution_rows(bad), TSV_COLUMNS)
    rows = list(csv.DictReader(open(tmp_path / "m.tsv"), delimiter="\t"))
    assert [r["encoder"] for r in rows] == ["tiny_a", "tiny_b"]
    assert float(rows[1]["fd"]) == pytest.approx(bad["encoders"]["tiny_b"]["fd"], rel=1e-5)


def test_fd_of_features_matches_direct_computation(stores):
    real, _, off, _, _ = stores
    enc = TimmAdapter("test_convnext", seed=1)
    a, b = ImageSet.open(real, split="test"), ImageSet.open(off)
    sa, _ = embed_set(enc, a, 6)
    sb, _ = embed_set(enc, b, 6)
    fa = enc.embed(np.concatenate(list(a.batches(64)))).numpy()
    fb = enc.embed(np.concatenate(list(b.batches(64)))).numpy()
    direct = frechet_distance_stats(gaussian_stats(fa), gaussian_stats(fb))
    assert frechet_distance_stats(sa.stats(), sb.stats()) == pytest.approx(direct, rel=1e-4)


@pytest.mark.slow
def test_cli_with_the_registry_encoder(stores, tmp_path):
    # The offline default encoder's weights are a declared dependency: no skip.
    real, same, _, _, _ = stores
    config = tmp_path / "config.yaml"
    config.write_text("evaluation: {device: cpu, knn_k: 2, manifold_samples: 10, batch_size: 8}\n")
    out = tmp_path / "metrics.json"
    run_cli("evaluate-distribution", "--real", real, "--synthetic", same, "--encoders",
            "efficientnet_lite0", "--config", config, "--out", out, "--tsv", tmp_path / "m.tsv")
    result = json.loads(out.read_text())
    enc = result["encoders"]["efficientnet_lite0"]
    assert enc["dim"] == 1280 and enc["fd"] < 1e-3 and enc["precision"] == 1.0
    assert (tmp_path / "m.tsv").read_text().startswith("variant\tencoder")
    # The real reference row: real patches of other slides in the synthetic's place, the val
    # split where it has patches, else train.
    ref = tmp_path / "real.json"
    run_cli("evaluate-distribution", "--real", real, "--synthetic", real, "--synthetic-split", "val,train",
            "--variant", "real", "--encoders", "efficientnet_lite0", "--config", config, "--out", ref)
    assert json.loads(ref.read_text())["synthetic"]["split"] == "val"
    no_val = write_patch_store(tmp_path / "no_val.zarr", *stores[3:], np.where(_SPLIT == 1, 0, _SPLIT))
    run_cli("evaluate-distribution", "--real", no_val, "--synthetic", no_val, "--synthetic-split", "val,train",
            "--variant", "real", "--encoders", "efficientnet_lite0", "--config", config, "--out", ref)
    assert json.loads(ref.read_text())["synthetic"]["split"] == "train"
    r = run_cli("evaluate-distribution", "--real", real, "--synthetic", real, "--synthetic-split", "val,holdout",
                "--config", config, "--out", ref, check=False)
    assert r.returncode != 0 and "--synthetic-split 'val,holdout'" in r.stderr


def test_settings_come_from_the_schema_checked_config(tmp_path):
    from histopipe.config import load_config, section
    from histopipe.errors import ConfigError
    from histopipe.evaluation.settings import load_settings

    default = load_settings()
    assert default.encoders == ("efficientnet_lite0",) and default.knn_k == 5
    assert default.segmentation.encoder == "resnet18" and default.segmentation.ignore_background
    cfg = load_config(overrides={"evaluation": {"encoders": ["a", "b"], "seed": 3,
                                                "segmentation": {"steps": 5, "image_size": 32}}})
    s = section(cfg, "evaluation", EvaluationSettings)
    assert s.encoders == ("a", "b") and s.seed == 3
    assert s.segmentation.steps == 5 and s.segmentation.batch_size == 8
    with pytest.raises(ConfigError, match="multiple of 16"):
        section(load_config(overrides={"evaluation": {"segmentation": {"image_size": 40}}}),
                "evaluation", EvaluationSettings)
    with pytest.raises(ConfigError, match="knn"):
        load_config(overrides={"evaluation": {"knn": 3}})


def _overlapping_store(path, rng, per_slide_attrs: bool):
    """Patches cut at a quarter of their size on two slides (each overlaps its neighbours)."""
    import zarr

    images, maps = toy_patches(24, 32, rng)
    split = np.full(24, 2, np.uint8)
    write_patch_store(path, images, maps, split)
    g = zarr.open_group(str(path), mode="r+")
    xy = np.stack([np.tile(np.arange(12) * 128, 2), np.zeros(24)], axis=1).astype(np.int64)
    g["coords"][:] = xy
    g["slide_id"][:] = np.array(["a"] * 12 + ["b"] * 12, dtype=object)
    g.attrs["config"] = {"patch_size": 512, "stride": 128}
    if per_slide_attrs:
        g.attrs["per_slide"] = {"a": {"kept": 12, "size_level0": 513.0}, "b": {"kept": 12, "size_level0": 513.0}}
    return path


@pytest.mark.parametrize("recorded", [True, False])
def test_patch_footprints_from_the_plan_or_inferred_from_the_grid(tmp_path, recorded):
    path = _overlapping_store(tmp_path / "p.zarr", np.random.default_rng(2), recorded)
    fp, why = patch_footprints(path, np.arange(24))
    assert why == "" and list(fp.slide[:2]) == ["a", "a"] and fp.slide[12] == "b"
    assert fp.side[0] == (513.0 if recorded else 512.0)  # smallest step 128 x 512 / 128
    import torch

    over = fp.overlaps(0, 24, torch.device("cpu")).numpy()
    assert over[0, :4].all() and not over[0, 5:].any()
    assert over[0, 4] == recorded  # 512 px apart: inside a 513 px window, just outside a 512 px one


def test_stores_without_window_geometry_keep_the_plain_estimator(stores):
    real, _, _, _, _ = stores
    fp, why = patch_footprints(real, np.arange(5))
    assert fp is None and "patch size" in why


def test_distribution_records_both_estimators_and_skips_unconditional_sources(tmp_path):
    real = _overlapping_store(tmp_path / "real.zarr", np.random.default_rng(6), True)
    images = ImageSet.open(real, "test").read(np.arange(24))[0]
    maps = np.zeros((24, 32, 32), np.uint16)
    settings = EvaluationSettings(encoders=("tiny_a",), device="cpu", knn_k=3, manifold_samples=24, batch_size=8)
    real_set = ImageSet.open(real, split="test")
    for variant in ("map_crops", "unconditional"):
        syn = write_synthetic_store(tmp_path / f"{variant}.zarr", images[::-1].copy(), maps, variant, np.arange(24)[::-1].copy())
        import zarr

        zarr.open_group(str(syn), mode="r+").attrs["dataset"] = str(real)
        out = evaluate_distribution(real_set, ImageSet.open(syn), settings, encoder_factory=tiny_factory)
        info, enc = out["knn_independent"], out["encoders"]["tiny_a"]
        assert info["enabled"] and info["real"]
        assert info["synthetic"] == (variant == "map_crops")
        assert enc["plain"] is not None and set(enc["plain"]) == {"precision", "recall", "density", "coverage"}
        assert enc["radius_fallback"] == {"real": 0, "synthetic": 0}
        if variant == "map_crops":
            fp, _ = synthetic_footprints(ImageSet.open(syn), np.arange(24))
            assert fp.xy[0, 0] == 11 * 128  # image 0 was made from patch 23's map
        else:
            assert "no map" in info["synthetic_reason"]
    off = evaluate_distribution(real_set, ImageSet.open(syn), EvaluationSettings(
        encoders=("tiny_a",), device="cpu", knn_k=3, manifold_samples=24, batch_size=8, knn_independent=False),
        encoder_factory=tiny_factory)
    assert off["knn_independent"] == {"enabled": False} and off["encoders"]["tiny_a"]["plain"] is None
