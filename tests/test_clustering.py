"""Tissue-type clustering: sampling caps, determinism, re-split, nested levels, saved models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from histopipe.clustering import ClusterConfig, ClusterModel, fit, resplit, ward_level_luts
from histopipe.errors import ConfigError, HistopipeError
from histopipe.sampling import (
    diversity_sample,
    normalize_rows,
    read_rows,
    sample_cohort,
    slide_quotas,
)
from tests.synthetic_stores import blobs, grid_coords, write_embedding_store

DIM = 24


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def centers() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((8, DIM)).astype(np.float32) * 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, centers) -> list:
    """Six slides of Gaussian blobs (8 modes), 150-2500 tiles each, one of them empty."""
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    paths = []
    for s, n in enumerate([2500, 1800, 150, 900, 0, 1200]):
        x, _ = blobs(n, centers, 0.3, rng)
        paths.append(write_embedding_store(root / f"s{s}.zarr", x.reshape(n, DIM), grid_coords(1, n, 256), slide_id=f"s{s}"))
    return paths


CFG = ClusterConfig(k=8, levels=(8, 4, 2, 1), per_slide_cap=400, total_cap=1500, niter=20, normalize="l2")


@pytest.fixture(scope="module")
def model(cohort) -> ClusterModel:
    return fit(cohort, CFG)


def test_config_validates_levels():
    assert ClusterConfig(k=10, levels=[2, 10, 5]).levels == (10, 5, 2)
    with pytest.raises(ConfigError, match="include k"):
        ClusterConfig(k=10, levels=(2, 5))
    with pytest.raises(ConfigError, match="exceed"):
        ClusterConfig(k=10, levels=(10, 20))
    with pytest.raises(ConfigError):
        ClusterConfig(normalize="pca")


def test_slide_quotas_respect_both_caps():
    counts = [10, 5000, 3000, 0, 999]
    q = slide_quotas(counts, per_slide_cap=1000, total_cap=2000)
    assert q.sum() == 2000
    assert np.all(q <= np.minimum(counts, 1000))
    # Proportional: the two capped slides keep equal shares, the tiny one keeps ~its share.
    assert q[1] == q[2] and q[3] == 0 and abs(q[4] - 999 * 2000 / 3009) <= 1
    assert list(slide_quotas(counts, 1000, 10**6)) == [10, 1000, 1000, 0, 999]


def test_diversity_sample_covers_rare_modes_and_is_deterministic(tmp_path):
    # One dominant mode and five rare ones (1 % of the tiles each); 100 random tiles would
    # miss a rare mode with probability ~0.37 each, the diversity sample must hit them all.
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((6, 128)).astype(np.float32) * 5
    which = np.concatenate([np.zeros(2375, int), np.repeat(np.arange(1, 6), 25)])
    x = centers[which] + 0.2 * rng.standard_normal((len(which), 128)).astype(np.float32)
    path = write_embedding_store(tmp_path / "s.zarr", x.astype(np.float16), grid_coords(1, len(x), 256), slide_id="s")
    a = diversity_sample(path, 100, seed=7)
    b = diversity_sample(path, 100, seed=7)
    assert np.array_equal(a, b)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert set(which[a]) == set(range(6))
    assert np.array_equal(diversity_sample(path, 5000, seed=7), np.arange(len(x)))


def test_cohort_sample_respects_caps(cohort):
    sample = sample_cohort(cohort, CFG.per_slide_cap, CFG.total_cap, CFG.seed, CFG.normalize)
    per_slide = np.bincount(sample.slide_index, minlength=len(cohort))
    assert len(sample.features) == per_slide.sum() <= CFG.total_cap
    assert np.all(per_slide <= CFG.per_slide_cap)
    # 400 + 400 + 150 + 400 + 0 + 400 = 1750 > 1500: every quota scaled by 1500/1750.
    np.testing.assert_array_equal(per_slide, slide_quotas([2500, 1800, 150, 900, 0, 1200], 400, 1500))
    assert per_slide[4] == 0 and abs(per_slide[2] - 150 * 1500 / 1750) < 1
    np.testing.assert_allclose(np.linalg.norm(sample.features, axis=1), 1.0, rtol=1e-5)
    # Each kept row is that slide's row: compare with the store itself.
    s0 = sample.slide_index == 0
    np.testing.assert_array_equal(sample.features[s0], read_rows(cohort[0], sample.rows[s0], "l2"))
    # Slides sampled by parallel worker processes: the same sample.
    parallel = sample_cohort(cohort, CFG.per_slide_cap, CFG.total_cap, CFG.seed, CFG.normalize, workers=2)
    np.testing.assert_array_equal(parallel.features, sample.features)
    np.testing.assert_array_equal(parallel.rows, sample.rows)


def test_fit_is_deterministic_and_records_metadata(cohort, model):
    a, b = model, fit(cohort, CFG)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.level_luts, b.level_luts)
    m = a.meta
    assert m["n_sampled"] <= CFG.total_cap and max(m["sampled_per_slide"].values()) <= CFG.per_slide_cap
    assert (m["encoder"], m["dim"], m["k"], m["levels"], m["seed"], m["normalize"]) == ("synthetic", DIM, 8, [8, 4, 2, 1], 0, "l2")
    assert sum(m["cluster_counts"]) == m["n_sampled"]
    c = fit(cohort, replace(CFG, seed=5))
    assert c.meta["seed"] == 5 and c.centroids.shape == a.centroids.shape


def test_hierarchy_is_nested(model, centers):
    luts = model.level_luts
    assert luts.shape == (4, 8) and np.array_equal(luts[0], np.arange(8))
    for level, n in enumerate(model.levels):
        assert sorted(set(luts[level])) == list(range(n))
    for fine in range(len(luts) - 1):
        for t in range(model.levels[fine]):
            # every type of a level lies inside exactly one type of the next coarser level
            assert len(set(luts[fine + 1][luts[fine] == t])) == 1
    ids = model.assign(blobs(500, centers, 0.3, np.random.default_rng(9))[0])
    assert ids.shape == (500, 4)
    np.testing.assert_array_equal(ids[:, 2], luts[2][ids[:, 0]])


def test_ward_levels_nest_on_random_centroids():
    rng = np.random.default_rng(2)
    c = rng.standard_normal((30, 5))
    luts = ward_level_luts(c, rng.integers(1, 50, 30), [30, 12, 5, 2, 1])
    for a, b in zip(luts[:-1], luts[1:], strict=True):
        pairs = set(zip(a, b, strict=True))
        assert len(pairs) == len(set(a))  # a function from level a to level b
    assert [len(set(r)) for r in luts] == [30, 12, 5, 2, 1]
    with pytest.raises(ConfigError):
        ward_level_luts(c, np.ones(30), [12, 30])


def test_resplit_splits_a_constructed_high_variance_cluster():
    rng = np.random.default_rng(4)
    modes = np.zeros((4, 16), np.float32)
    modes[0, 0], modes[1, 0], modes[2, 1], modes[3, 2] = -10, 10, 10, 10  # A, B far apart; C; D
    which = np.repeat(np.arange(4), 100)
    x = modes[which] + 0.1 * rng.standard_normal((400, 16)).astype(np.float32)
    # A bad clustering: one centroid between A and B (high variance), C cut in two halves.
    bad = np.stack([(modes[0] + modes[1]) / 2, modes[2] + 0.05, modes[2] - 0.05, modes[3]]).astype(np.float32)
    fixed, events = resplit(x, bad, factor=3.0, seed=0, niter=10, spherical=False)
    assert [e["split"] for e in events] == [0]
    assert fixed.shape == bad.shape
    labels = np.argmin(((x[:, None] - fixed[None]) ** 2).sum(-1), axis=1)
    assert len(set(zip(which, labels, strict=True))) == 4  # every mode is one cluster
    unchanged, none = resplit(x, bad, factor=0, seed=0, niter=10, spherical=False)
    assert none == [] and unchanged is bad


def test_saved_model_reproduces_labels(model, tmp_path, centers):
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["centroids.npy", "level_luts.npy", "model.json"]
    loaded = ClusterModel.load(tmp_path / "model")
    assert loaded.meta == model.meta
    # A new cohort (not used in fitting) assigned with the saved model: same labels as
    # brute-force nearest centroid on L2-normalised features.
    rng = np.random.default_rng(11)
    x, _ = blobs(700, centers, 0.3, rng)
    new = write_embedding_store(tmp_path / "new.zarr", x, grid_coords(1, 700, 256), slide_id="new")
    ids = loaded.assign_store(new)
    xn = normalize_rows(x, "l2")
    brute = np.argmin(((xn[:, None] - model.centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(ids[:, 0], brute)
    np.testing.assert_array_equal(ids, model.assign(x))


def test_model_refuses_other_encoder_and_bad_folder(model, cohort, tmp_path):
    other = write_embedding_store(tmp_path / "o.zarr", np.ones((5, DIM + 1), np.float32), grid_coords(1, 5, 256), slide_id="o")
    with pytest.raises(HistopipeError, match="does not match"):
        model.assign_store(other)
    renamed = write_embedding_store(tmp_path / "r.zarr", np.ones((5, DIM), np.float32), grid_coords(1, 5, 256), slide_id="r", encoder="uni")
    with pytest.raises(HistopipeError, match="encoder 'uni'"):
        model.assign_store(renamed)
    with pytest.raises(HistopipeError, match="not a cluster model"):
        ClusterModel.load(tmp_path)
    with pytest.raises(HistopipeError, match="at least k"):
        fit(cohort[2:3], replace(CFG, k=200, levels=(200,)))
