"""Two-level fit: batch summaries, the cohort step over them, bad inputs, model format."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from histopipe.clustering import ClusterConfig, ClusterModel, fit_samples, nearest
from histopipe.errors import HistopipeError
from histopipe.summaries import fit_two_level, read_summary, summarize_batch, write_summary
from tests.helpers import run_cli
from tests.synthetic_stores import blobs, write_sample_store

DIM = 24
SIZES = [400, 380, 150, 400, 0, 300]  # sampled tiles per slide; one slide without tissue
CFG = ClusterConfig(k=8, levels=(8, 4, 2, 1), per_slide_cap=400, total_cap=5000, niter=20, batch_centroids=4000)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def centers() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((8, DIM)).astype(np.float32) * 4


def write_slides(root, centers, sizes=SIZES, prefix="s", dim=DIM, encoder="synthetic") -> list:
    rng = np.random.default_rng(len(prefix) + len(sizes))
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for s, n in enumerate(sizes):
        x, _ = blobs(n, centers[:, :dim], 0.3, rng)
        out.append(write_sample_store(root / f"{prefix}{s}.zarr", x.reshape(n, dim), slide_id=f"{prefix}{s}",
                                      per_slide_cap=CFG.per_slide_cap, encoder=encoder))
    return out


def summarize(paths, out, cfg=CFG):
    write_summary(out, summarize_batch(paths, cfg))
    return out


def test_one_exact_batch_equals_the_one_level_fit(tmp_path, centers):
    samples = write_slides(tmp_path / "samples", centers)
    summary = summarize(samples[::-1], tmp_path / "batch-00000.zarr")
    s = read_summary(summary)
    assert s.attrs["exact"] and len(s.centroids) == sum(SIZES) and s.attrs["empty_slides"] == ["s4"]
    one = fit_samples(samples, CFG)
    two = fit_two_level(samples, [summary], CFG)
    np.testing.assert_array_equal(two.centroids, one.centroids)
    np.testing.assert_array_equal(two.level_luts, one.level_luts)
    assert two.meta["cluster_counts"] == one.meta["cluster_counts"]
    assert two.meta["exact"] and two.meta["refine_objective"] == [] and two.meta["n_sampled"] == sum(SIZES)


def test_many_lossy_batches_refine_over_every_tile(tmp_path, centers):
    samples = [p for b in range(4) for p in write_slides(tmp_path / f"b{b}", centers, prefix=f"b{b}s")]
    cfg = replace(CFG, batch_centroids=30, total_cap=70, refine_passes=2)
    summaries = [summarize(samples[b * 6 : b * 6 + 6], tmp_path / f"batch-{b:05d}.zarr", cfg) for b in range(4)]
    assert all(len(read_summary(p).centroids) <= 30 and not read_summary(p).attrs["exact"] for p in summaries)
    model = fit_two_level(samples, summaries, cfg)
    m = model.meta
    # 4 × 30 sub-centroids exceed total_cap = 70: those held were summarised again.
    assert m["summary_reductions"] >= 1 and m["n_subcentroids"] <= 70 and not m["exact"]
    assert m["n_sampled"] == sum(m["cluster_counts"]) == 4 * sum(SIZES)
    assert len(m["refine_objective"]) == 3 and m["refine_objective"][-1] <= m["refine_objective"][0] + 1e-6
    # Every blob is one type: the tiles of a blob share their nearest centroid.
    x, which = blobs(2000, centers, 0.3, np.random.default_rng(5))
    labels = model.assign(x)[:, 0]
    assert len(set(zip(which, labels, strict=True))) == 8 and len(set(labels)) == 8
    # The objective over every tile is no worse than the one-level fit's on all of them.
    one = fit_samples(samples, replace(cfg, total_cap=10**6))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert nearest(xn, model.centroids)[1].mean() <= nearest(xn, one.centroids)[1].mean() * 1.01


def test_model_folder_is_unchanged_and_old_models_load(tmp_path, centers):
    samples = write_slides(tmp_path / "samples", centers)
    model = fit_two_level(samples, [summarize(samples, tmp_path / "batch.zarr", replace(CFG, batch_centroids=50))],
                          replace(CFG, batch_centroids=50))
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["centroids.npy", "level_luts.npy", "model.json"]
    loaded = ClusterModel.load(tmp_path / "model")
    assert loaded.meta == model.meta and loaded.meta["format"] == 1
    # A model written before the two-level fit: its config lacks the new keys; it loads and assigns.
    old = tmp_path / "old"
    one = fit_samples(samples, CFG)
    one.meta["config"] = {k: v for k, v in one.meta["config"].items()
                          if k not in ("method", "batch_centroids", "refine_passes", "refit")}
    one.save(old)
    assert "method" not in json.loads((old / "model.json").read_text())["config"]
    x, _ = blobs(100, centers, 0.3, np.random.default_rng(2))
    np.testing.assert_array_equal(ClusterModel.load(old).assign(x), one.assign(x))


def test_other_encoder_or_dim_names_both_stores(tmp_path, centers):
    good = write_slides(tmp_path / "a", centers, sizes=[200, 200])
    wide = write_slides(tmp_path / "b", np.hstack([centers, centers[:, :1]]), sizes=[200], prefix="w", dim=DIM + 1)
    other = write_slides(tmp_path / "c", centers, sizes=[200], prefix="u", encoder="uni")
    with pytest.raises(HistopipeError, match=r"w0\.zarr.*dim 25.*a/s0\.zarr.*dim 24") as err:
        summarize_batch([*good, *wide], CFG)
    assert "\n" not in str(err.value)
    summaries = [summarize(good, tmp_path / "batch-00000.zarr")]
    # Stores of different batches, each batch consistent: the cohort step refuses them, naming both.
    for bad, name in ((wide, "w0"), (other, "u0")):
        summaries_bad = [*summaries, summarize(bad, tmp_path / f"batch-{name}.zarr")]
        with pytest.raises(HistopipeError, match=rf"{name}\.zarr.*differs from .*s0\.zarr") as err:
            fit_two_level([*good, *bad], summaries_bad, CFG)
        assert "\n" not in str(err.value)


def test_batch_of_failed_slides_contributes_nothing_and_is_reported(tmp_path, centers, caplog):
    samples = write_slides(tmp_path / "ok", centers, sizes=[300, 300])
    failed = write_slides(tmp_path / "failed", centers, sizes=[0, 0], prefix="f")
    ok_summary = summarize(samples, tmp_path / "batch-00000.zarr", replace(CFG, batch_centroids=50))
    empty = summarize(failed, tmp_path / "batch-00001.zarr", replace(CFG, batch_centroids=50))
    assert len(read_summary(empty).centroids) == 0 and read_summary(empty).attrs["empty_slides"] == ["f0", "f1"]
    model = fit_two_level([*samples, *failed], [ok_summary, empty], replace(CFG, batch_centroids=50))
    assert model.meta["empty_batches"] == [{"summary": str(empty), "slides": ["f0", "f1"]}]
    assert model.meta["sampled_per_slide"]["f0"] == 0 and sum(model.meta["cluster_counts"]) == 600
    assert "contributes nothing" in caplog.text
    # A slide without a summary, or summarised twice, is refused.
    with pytest.raises(HistopipeError, match="no batch summary"):
        fit_two_level([*samples, *failed], [ok_summary], replace(CFG, batch_centroids=50))


def test_cli_summarize_then_fit(tmp_path, centers):
    samples = write_slides(tmp_path / "samples", centers)
    lst = tmp_path / "samples.txt"
    lst.write_text("".join(f"{p}\n" for p in samples))
    cfg = json.dumps({"clustering": {"k": 8, "levels": [8, 2], "per_slide_cap": 400, "batch_centroids": 40}})
    r = run_cli("summarize-samples", "--samples-list", lst, "--out", tmp_path / "b.zarr", "--config-json", cfg)
    assert r.returncode == 0, r.stderr
    assert "1630 sampled tiles -> 40 sub-centroids, 1 slide(s) without sampled tiles" in r.stdout
    r = run_cli("fit-clusters", "--samples-list", lst, "--summaries", tmp_path / "b.zarr", "--out", tmp_path / "m",
                "--config-json", cfg)
    assert r.returncode == 0, r.stderr
    assert ClusterModel.load(tmp_path / "m").meta["method"] == "two_level"
    r = run_cli("fit-clusters", "--summaries", tmp_path / "b.zarr", "--out", tmp_path / "m2", "--config-json", cfg)
    assert r.returncode != 0 and "sample stores are needed" in r.stderr
