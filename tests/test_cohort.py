"""The cohort and target lists the Snakefile is built from."""

import pytest

from histopipe.config import load_config
from histopipe.errors import ConfigError
from histopipe.sheet import SlideEntry
from histopipe.workflow import Cohort


def _entries(tmp_path, annotated: list[bool]) -> list[SlideEntry]:
    out = []
    for i, a in enumerate(annotated):
        out.append(SlideEntry(f"s{i}", tmp_path / f"s{i}.svs", annotation=(tmp_path / f"s{i}.xml") if a else None))
    return out


def test_kmeans_cohort_paths_and_variants(tmp_path):
    cfg = load_config(None, {"results": "out", "clustering": {"k": 8, "levels": [2, 8]}})
    c = Cohort(_entries(tmp_path, [False, True]), cfg)
    assert c.map_source == "kmeans"
    assert c.map_store("s1") == "out/maps/efficientnet_lite0/mpp0.5_px256/k8/batch-00000/s1.zarr"
    assert c.dataset_id == "efficientnet_lite0_mpp0.5_px256_k8_mpp0.5_px512"
    assert c.variants == ["unconditional", "map", "map_crop_embeddings", "map_crops"]
    runs = c.segmentation_runs()
    assert ("real", "real") in runs and ("both", "map_crops") in runs and len(runs) == 6
    outs = c.final_outputs()
    assert len(outs) == len(set(outs))
    assert f"out/models/{c.dataset_id}/vae/model" not in outs  # reached through the figures
    assert any(o.endswith("training_vae.png") for o in outs)


def test_annotation_source(tmp_path):
    cfg = load_config(None, {"results": "out"})
    c = Cohort(_entries(tmp_path, [True, True]), cfg)
    assert c.map_source == "annotation" and c.dataset_id.startswith("annotation_")
    assert c.map_store("s0") == "out/maps/annotation/mpp0.5_px256/batch-00000/s0.zarr"
    assert c.batch_commands("map", "00000", "d")[1][:3] == ["annotation-map", str(tmp_path / "s1.svs"), str(tmp_path / "s1.xml")]
    cfg = load_config(None, {"labels": {"source": "annotation"}})
    with pytest.raises(ConfigError, match="s1"):
        Cohort(_entries(tmp_path, [True, False]), cfg)


def test_existing_model_and_pretrained_vae(tmp_path):
    cfg = load_config(None, {"clustering": {"model": "/models/tcga"}, "vae": {"pretrained": "/models/sd-vae"}})
    c = Cohort(_entries(tmp_path, [False]), cfg)
    assert c.cluster_model() == "/models/tcga" and c.vae_model() == "/models/sd-vae"
    assert not any(o.endswith("training_vae.png") for o in c.final_outputs())
    cfg = load_config(None, {"ldm": {"variant": "map"}, "evaluation": {"variants": ["unconditional"]}})
    assert Cohort(_entries(tmp_path, [False]), cfg).variants == ["unconditional", "map"]


def test_batches_are_consecutive_sheet_rows_and_appending_keeps_them(tmp_path):
    cfg = load_config(None, {"results": "out", "slides_per_batch": 2})
    c = Cohort(_entries(tmp_path, [False] * 5), cfg)
    assert c.batches == {"00000": ["s0", "s1"], "00001": ["s2", "s3"], "00002": ["s4"]}
    assert c.map_batches()[1] == "out/maps/efficientnet_lite0/mpp0.5_px256/k100/batch-00001"
    assert c.map_store("s3") == c.map_batches()[1] + "/s3.zarr"
    assert c.cluster_samples()[4] == "out/clusters/efficientnet_lite0/mpp0.5_px256/samples/batch-00002/s4.zarr"
    assert c.slide_patch_stores()[0].endswith("/slides/batch-00000/s0.zarr")
    # Appending slides changes only the last batch and adds new ones.
    bigger = Cohort(_entries(tmp_path, [False] * 8), cfg)
    assert {b: m for b, m in bigger.batches.items() if b < "00002"} == {b: m for b, m in c.batches.items() if b < "00002"}
    assert bigger.batches["00002"] == ["s4", "s5"] and list(bigger.batches)[-1] == "00003"


def test_batch_commands_cover_each_slide_of_the_batch(tmp_path):
    cfg = load_config(None, {"results": "out", "slides_per_batch": 2})
    c = Cohort(_entries(tmp_path, [False] * 3), cfg)
    sample = c.batch_commands("sample", "00001", "outdir", '{"clustering": {}}')
    assert sample == [["sample-embeddings", "out/embeddings/efficientnet_lite0/mpp0.5_px256/s2.zarr", "--out",
                       "outdir/s2.zarr", "--config-json", '{"clustering": {}}']]
    maps = c.batch_commands("map", "00000", "m")
    assert [m[0] for m in maps] == ["assign-clusters"] * 2
    assert maps[1][maps[1].index("--png") + 1] == "m/s1.png" and maps[1][maps[1].index("--geojson") + 1] == "m/s1.geojson"
    patches = c.batch_commands("patches", "00000", "p", "{}", on_error="skip")
    assert patches[0][1] == c.map_store("s0") and patches[0][patches[0].index("--on-error") + 1] == "skip"
    assert patches[1][patches[1].index("--slide-id") + 1] == "s1"
    with pytest.raises(ValueError, match="stage"):
        c.batch_commands("bogus", "00000", "x")


def test_an_existing_fitted_model_is_kept_for_appended_slides_unless_refit(tmp_path):
    cfg = load_config(None, {"results": str(tmp_path / "out"), "slides_per_batch": 2})
    c = Cohort(_entries(tmp_path, [False] * 3), cfg)
    assert c.fits_clusters and c.cluster_model() == c.fitted_cluster_model()
    assert c.cluster_summaries() == [f"{tmp_path}/out/clusters/efficientnet_lite0/mpp0.5_px256/summaries/batch-{b}.zarr"
                                     for b in ("00000", "00001")]
    (tmp_path / "out" / "clusters" / "efficientnet_lite0" / "mpp0.5_px256" / "k100" / "model").mkdir(parents=True)
    appended = Cohort(_entries(tmp_path, [False] * 5), cfg)
    assert not appended.fits_clusters and appended.cluster_model() == c.fitted_cluster_model()
    refit = load_config(None, {"results": str(tmp_path / "out"), "clustering": {"refit": True}})
    assert Cohort(_entries(tmp_path, [False] * 5), refit).fits_clusters
    other_k = load_config(None, {"results": str(tmp_path / "out"), "clustering": {"k": 8, "levels": [8]}})
    assert Cohort(_entries(tmp_path, [False] * 5), other_k).fits_clusters  # another model folder
    given = load_config(None, {"clustering": {"model": "/models/tcga", "refit": True}})
    assert not Cohort(_entries(tmp_path, [False]), given).fits_clusters
