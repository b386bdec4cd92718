"""Per-slide sample stores and the cohort fit from them: caps, priority order, same model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr

from histopipe.cli import main
from histopipe.clustering import ClusterConfig, fit, fit_samples
from histopipe.errors import HistopipeError
from histopipe.sampling import priority_order, read_rows, sample_cohort, sample_slide, slide_quotas
from histopipe.slide_samples import cohort_from_samples, read_prefix, sample_info, write_sample
from tests.helpers import run_cli
from tests.synthetic_stores import blobs, grid_coords, write_embedding_store

DIM = 24
SIZES = [2500, 1800, 150, 900, 0, 1200]  # tiles per slide; one slide without tissue
CFG = ClusterConfig(k=8, levels=(8, 4, 2, 1), per_slide_cap=400, total_cap=1500, niter=20, normalize="l2")


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def write_cohort(root, sizes=SIZES, dtype=np.float32) -> list:
    """Slides of Gaussian blobs (8 modes), listed in reverse slide-id order."""
    centers = np.random.default_rng(1).standard_normal((8, DIM)).astype(np.float32) * 4
    rng = np.random.default_rng(0)
    paths = []
    for s, n in enumerate(sizes):
        x, _ = blobs(n, centers, 0.3, rng)
        paths.append(write_embedding_store(root / f"s{s}.emb.zarr", x.reshape(n, DIM).astype(dtype), grid_coords(1, n, 256),
                                           slide_id=f"s{s}"))
    return paths[::-1]


def write_samples(stores, root, cfg: ClusterConfig = CFG) -> list:
    out = []
    for path in stores:
        sample = sample_slide(path, cfg.per_slide_cap, cfg.seed, cfg.normalize)
        out.append(root / path.name.replace(".emb.", ".sample."))
        write_sample(out[-1], sample, cfg.per_slide_cap, cfg.seed, cfg.normalize)
    return out


def covering_radius(x: np.ndarray, subset: np.ndarray) -> float:
    """Largest distance from a row of ``x`` to its nearest row of ``x[subset]``."""
    d2 = ((x[:, None] - x[subset][None]) ** 2).sum(-1)
    return float(np.sqrt(d2.min(axis=1).max()))


def test_slide_sample_respects_cap_is_deterministic_and_round_trips(tmp_path):
    store = write_cohort(tmp_path, [700])[0]
    a = sample_slide(store, 300, seed=3)
    b = sample_slide(store, 300, seed=3)
    assert len(a.rows) == 300 and len(np.unique(a.rows)) == 300 and a.rows.dtype == np.int64
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.features, read_rows(store, a.rows, "l2"))  # unsorted rows: read one by one
    assert not np.all(np.diff(a.rows) > 0)  # priority order, not row order
    # A cap above the slide's size takes every tile, still in priority order.
    whole = sample_slide(store, 5000, seed=3)
    assert sorted(whole.rows) == list(range(700))
    write_sample(tmp_path / "s.zarr", a, 300, 3, "l2")
    info = sample_info(tmp_path / "s.zarr")
    assert (info.m, info.store.n, info.store.dim, info.store.slide_id) == (300, 700, DIM, "s0")
    attrs = info.store.attrs
    assert (attrs["per_slide_cap"], attrs["seed"], attrs["normalize"], attrs["order"], attrs["encoder"]) == (300, 3, "l2", "priority", "synthetic")
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    # Stored as embedded (float16 from embed-tiles: half of float32 on disk), normalised when
    # read: the fit sees exactly the features the embedding store gives.
    assert g["features"].dtype == zarr.open_group(store, mode="r")["features"].dtype
    assert g["rows"].dtype == np.int64 and attrs["features"] == "raw"
    np.testing.assert_array_equal(g["rows"][:], a.rows)
    np.testing.assert_array_equal(np.asarray(g["features"][:], np.float32), read_rows(store, a.rows, "none"))
    rows, features = read_prefix(tmp_path / "s.zarr", 120)
    np.testing.assert_array_equal(rows, a.rows[:120])
    np.testing.assert_array_equal(features, a.features[:120])


def test_priority_prefix_covers_every_blob(tmp_path):
    # Ten well-separated blobs, one holding 80 % of the tiles and five only 1 % each.
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((10, 64)).astype(np.float32) * 5
    sizes = [2400, 120, 120, 120, 60, 30, 30, 30, 30, 30]
    which = np.repeat(np.arange(10), sizes)
    x = (centers[which] + 0.2 * rng.standard_normal((len(which), 64))).astype(np.float32)
    store = write_embedding_store(tmp_path / "b.zarr", x, grid_coords(1, len(x), 256), slide_id="b")
    sample = sample_slide(store, 200, seed=0, normalize="none")
    blob = which[sample.rows]
    assert set(blob) == set(range(10))
    for q in (10, 15, 40):
        assert set(blob[:q]) == set(range(10))  # every prefix of q >= #blobs has every blob
    # A random q-subset of the same sample misses blobs most of the time, and covers worse.
    draws = [rng.choice(200, 10, replace=False) for _ in range(200)]
    assert np.mean([len(set(blob[d])) == 10 for d in draws]) < 0.2
    feats = sample.features
    for q in (10, 20, 50):
        prefix = covering_radius(feats, np.arange(q))
        assert prefix <= min(covering_radius(feats, rng.choice(200, q, replace=False)) for _ in range(20))
    # Greedy max-min: each next row is the farthest from those before it.
    order = priority_order(feats)
    assert np.array_equal(order, np.arange(200))  # the stored sample is already in that order


def test_cohort_step_respects_caps_and_reads_prefixes(tmp_path):
    stores = write_cohort(tmp_path)
    samples = write_samples(stores, tmp_path)
    cohort = cohort_from_samples(samples, CFG.per_slide_cap, CFG.total_cap, CFG.seed, CFG.normalize)
    assert [s.slide_id for s in cohort.stores] == [f"s{i}" for i in range(6)]  # by slide id, not listing order
    per_slide = np.bincount(cohort.slide_index, minlength=6)
    np.testing.assert_array_equal(per_slide, slide_quotas(SIZES, CFG.per_slide_cap, CFG.total_cap))
    assert per_slide.sum() == len(cohort.features) == CFG.total_cap and per_slide.max() <= CFG.per_slide_cap
    assert per_slide[4] == 0
    # Slide s1 (400 sampled, quota 343): its first 343 sampled rows, nothing else.
    s1 = cohort.slide_index == 1
    g = zarr.open_group(samples[-2], mode="r")
    np.testing.assert_array_equal(cohort.rows[s1], g["rows"][: per_slide[1]])
    np.testing.assert_array_equal(cohort.features[s1], read_prefix(samples[-2], per_slide[1])[1])
    # A tighter cap: still within it, and every slide keeps a prefix of the looser one.
    tight = cohort_from_samples(samples, CFG.per_slide_cap, 300, CFG.seed, CFG.normalize)
    assert len(tight.features) == 300
    for s in range(6):
        n = int((tight.slide_index == s).sum())
        np.testing.assert_array_equal(tight.rows[tight.slide_index == s], cohort.rows[cohort.slide_index == s][:n])


def test_fit_from_samples_equals_fit_from_stores_without_opening_them(tmp_path):
    stores = write_cohort(tmp_path)
    direct = fit(stores, CFG)
    assert direct.meta["sampled_per_slide"]["s4"] == 0
    in_process = sample_cohort(stores[::-1], CFG.per_slide_cap, CFG.total_cap, CFG.seed, CFG.normalize)
    samples = write_samples(stores, tmp_path)
    for path in stores:  # the cohort step must not need the embedding stores
        shutil.rmtree(path)
    from_samples = cohort_from_samples(samples, CFG.per_slide_cap, CFG.total_cap, CFG.seed, CFG.normalize)
    np.testing.assert_array_equal(from_samples.features, in_process.features)
    np.testing.assert_array_equal(from_samples.rows, in_process.rows)
    model = fit_samples(samples, CFG)
    np.testing.assert_array_equal(model.centroids, direct.centroids)
    np.testing.assert_array_equal(model.level_luts, direct.level_luts)
    assert model.meta == direct.meta
    assert model.meta["n_sampled"] == CFG.total_cap and model.meta["n_slides"] == 6
    # Samples made with other settings than the fit's are refused, naming the store.
    with pytest.raises(HistopipeError, match="re-run sample-embeddings"):
        fit_samples(samples, replace(CFG, per_slide_cap=300))


def test_float16_embeddings_give_float16_samples_and_the_same_cohort_sample(tmp_path):
    """As embed-tiles writes them: the sample stores keep float16 (half the disk) and the
    cohort step reads exactly the normalised features of the embedding stores."""
    stores = write_cohort(tmp_path, [700, 300], dtype=np.float16)
    samples = write_samples(stores, tmp_path)
    assert all(zarr.open_group(p, mode="r")["features"].dtype == np.float16 for p in samples)
    a = cohort_from_samples(samples, CFG.per_slide_cap, 600, CFG.seed, CFG.normalize)
    b = sample_cohort(stores, CFG.per_slide_cap, 600, CFG.seed, CFG.normalize)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.features, b.features)
    assert a.features.dtype == np.float32 and np.allclose(np.linalg.norm(a.features, axis=1), 1, atol=1e-5)


def test_empty_slide_gives_a_valid_empty_sample(tmp_path):
    store = write_embedding_store(tmp_path / "e.zarr", np.zeros((0, DIM), np.float16), np.zeros((0, 2)), slide_id="e")
    sample = sample_slide(store, 400, seed=0)
    assert sample.rows.shape == (0,) and sample.features.shape == (0, DIM)
    write_sample(tmp_path / "e.sample.zarr", sample, 400, 0, "l2")
    info = sample_info(tmp_path / "e.sample.zarr")
    assert (info.m, info.store.n, info.store.dim) == (0, 0, DIM)
    with pytest.raises(HistopipeError, match="at least k"):
        fit_samples([tmp_path / "e.sample.zarr"], CFG)


@pytest.mark.slow
def test_cli_sample_then_fit_equals_fit_on_stores(tmp_path):
    stores = write_cohort(tmp_path, [900, 0, 600])
    cfg = json.dumps({"clustering": {"k": 6, "levels": [6, 3], "per_slide_cap": 200, "total_cap": 300}})
    r = run_cli("fit-clusters", *stores, "--out", tmp_path / "direct", "--config-json", cfg)
    assert r.returncode == 0, r.stderr
    samples = []
    for path in stores:
        samples.append(tmp_path / "samples" / path.name.replace(".emb.", "."))
        r = run_cli("sample-embeddings", path, "--out", samples[-1], "--config-json", cfg)
        assert r.returncode == 0, r.stderr
    (tmp_path / "samples.txt").write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in samples))
    r = run_cli("fit-clusters", "--samples-list", tmp_path / "samples.txt", "--out", tmp_path / "model", "--config-json", cfg)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / m / "model.json").read_text()) for m in ("direct", "model"))
    assert a == b and b["sampled_per_slide"] == {"s0": 150, "s1": 0, "s2": 150}  # 200 + 0 + 200 scaled to 300
    np.testing.assert_array_equal(np.load(tmp_path / "direct" / "centroids.npy"), np.load(tmp_path / "model" / "centroids.npy"))

def test_cli_refuses_stores_and_samples_together(tmp_path, capsys):
    assert main(["fit-clusters", str(tmp_path / "a.zarr"), "--samples", str(tmp_path / "b.zarr"), "--out", str(tmp_path / "m")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["fit-clusters", "--samples", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "m")]) == 2
    assert "not a readable sample store" in capsys.readouterr().err
