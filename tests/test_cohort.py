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
    assert c.map_store("s1") == "out/maps/efficientnet_lite0/mpp0.5_px256/k8/s1.zarr"
    assert c.dataset_id == "efficientnet_lite0_mpp0.5_px256_k8_mpp0.5_px512"
    assert c.variants == ["unconditional", "map", "map_crop_embeddings", "map_crops"]
    runs = c.segmentation_runs()
    assert ("real", "real") in runs and ("both", "map_crops") in runs and len(runs) == 6
    outs = c.final_outputs()
    assert len(outs) == len(set(outs))
    assert "out/models/%s/vae/model" % c.dataset_id not in outs  # reached through the figures
    assert any(o.endswith("training_vae.png") for o in outs)


def test_annotation_source(tmp_path):
    cfg = load_config(None, {"results": "out"})
    c = Cohort(_entries(tmp_path, [True, True]), cfg)
    assert c.map_source == "annotation" and c.dataset_id.startswith("annotation_")
    assert c.map_store("s0") == "out/maps/annotation/mpp0.5_px256/s0.zarr"
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
