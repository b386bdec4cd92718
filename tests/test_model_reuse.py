"""Trained generative models reused for a new cohort (ldm.models): the label space that maps,
datasets and pipelines record, and the checks made before any job runs or any image is drawn."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from histopipe.clustering import MODEL_FORMAT, ClusterModel
from histopipe.config import load_config
from histopipe.errors import ConfigError, HistopipeError
from histopipe.label_space import (
    LabelSpace,
    check_dataset,
    pipeline_label_space,
    pipeline_record,
    pipeline_variant,
)
from histopipe.sheet import SlideEntry
from histopipe.workflow import Cohort

K = 4
PATCHES = {"mpp": 0.5, "patch_size": 512, "output_size": 32}  # stored at 8 µm/px, 32 px


def _cluster_model(folder, seed: int = 0) -> ClusterModel:
    rng = np.random.default_rng(seed)
    model = ClusterModel(rng.standard_normal((K, 8)).astype(np.float32), np.array([[0, 1, 2, 3], [0, 0, 1, 1]], np.int32),
                         {"format": MODEL_FORMAT, "levels": [K, 2], "encoder": "efficientnet_lite0", "normalize": "l2", "k": K})
    model.save(folder)
    return model


def _space(model: ClusterModel, folder) -> dict:
    return LabelSpace("kmeans", model.k + 1, tuple(model.label_names()), model.model_id, str(folder)).to_dict()


def _pipeline(folder, variant: str, label_space: dict | None, mpp: float = 8.0, size: int = 32) -> None:
    """A real (untrained) tiny pipeline saved as train-ldm exports it."""
    import torch

    from histopipe.diffusion.models import build_vae
    from histopipe.diffusion.tasks import LDMTask
    from tests.diffusion_helpers import tiny_ldm, tiny_vae

    torch.manual_seed(0)
    luts = np.array([[0, 1, 2, 3, 4], [0, 1, 1, 2, 2]], np.int32)
    names = ["background", *[f"type {t}" for t in range(K)]]
    task = LDMTask(tiny_ldm(variant=variant), build_vae(tiny_vae(), size), size, luts, {}, names, mpp, label_space=label_space)
    task.pipeline(task.model.eval()).save_pretrained(folder)


def _cohort(tmp_path, **overrides) -> Cohort:
    cfg = load_config(None, {"results": str(tmp_path / "out"), "patches": PATCHES, "clustering": {"k": K, "levels": [K, 2]},
                             "evaluation": {"variants": ["unconditional", "map_crops"]}, **overrides})
    return Cohort([SlideEntry("new1", tmp_path / "new1.svs"), SlideEntry("new2", tmp_path / "new2.svs")], cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cluster model and the two pipelines trained on its maps, laid out as a run writes them."""
    root = tmp_path_factory.mktemp("trained")
    model = _cluster_model(root / "clusters")
    space = _space(model, root / "clusters")
    for variant in ("unconditional", "map_crops"):
        _pipeline(root / "models" / f"ldm_{variant}" / "model", variant, space)
    return root


def test_cluster_model_id_follows_the_types_not_the_folder(tmp_path):
    model = _cluster_model(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert ClusterModel.load(tmp_path / "b").model_id == model.model_id == ClusterModel.load(tmp_path / "a").model_id
    assert _cluster_model(tmp_path / "c", seed=1).model_id != model.model_id
    luts = model.level_luts.copy()
    luts[1] = [0, 1, 1, 1]
    assert ClusterModel(model.centroids, luts, model.meta).model_id != model.model_id


def test_pipelines_record_their_variant_and_label_space(trained):
    for variant in ("unconditional", "map_crops"):
        record = pipeline_record(trained / "models" / f"ldm_{variant}" / "model")
        assert pipeline_variant(record) == variant
        space = pipeline_label_space(record)
        assert space.source == "kmeans" and space.num_labels == K + 1
        assert space.cluster_model_id == ClusterModel.load(trained / "clusters").model_id


def test_reused_pipelines_train_nothing_and_synthesise(tmp_path, trained):
    c = _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(trained / "clusters")},
                ldm={"models": str(trained / "models")})
    c.check_reuse()
    assert c.trained_variants == [] and not c.trains_vae
    assert c.ldm_model("map_crops") == str(trained / "models" / "ldm_map_crops" / "model")
    outs = c.final_outputs()
    assert not any("training_" in o for o in outs)  # no training curves: nothing is trained
    assert any(o.endswith("ldm_map_crops/held-out.flags.csv") for o in outs)  # synthesised and flagged

    # A mapping reuses one variant; the other is trained here, with a VAE.
    c = _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(trained / "clusters")},
                ldm={"models": {"map_crops": str(trained / "models" / "ldm_map_crops" / "model")}})
    c.check_reuse()
    assert c.trained_variants == ["unconditional"] and c.trains_vae
    assert c.ldm_model("unconditional") == f"{tmp_path}/out/models/{c.dataset_id}/ldm_unconditional/model"
    assert any(o.endswith("training_ldm_unconditional.png") for o in c.final_outputs())
    assert not any(o.endswith("training_ldm_map_crops.png") for o in c.final_outputs())


def test_reuse_is_refused_with_what_differs(tmp_path, trained):
    models = str(trained / "models")
    # Tissue types fitted anew: the pipelines know only those they were trained on.
    with pytest.raises(ConfigError, match=r"fits new tissue types.*set clustering.model") as err:
        _cohort(tmp_path, ldm={"models": models}).check_reuse()
    assert str(trained / "clusters") in str(err.value)
    # Another cluster model with the same k.
    _cluster_model(tmp_path / "other", seed=3)
    with pytest.raises(ConfigError, match=r"map_crops .*tissue types of cluster model") as err:
        _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(tmp_path / "other")}, ldm={"models": models}).check_reuse()
    assert "unconditional" in str(err.value)  # every variant that does not fit is named
    # Another magnification and patch size.
    with pytest.raises(ConfigError, match=r"trained at 8 µm/px, the patches are 4 µm/px.*makes 32 px images, the patches are 64 px"):
        _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(trained / "clusters")},
                patches={**PATCHES, "output_size": 64}, ldm={"models": models}).check_reuse()
    # A pipeline under the wrong variant, and a folder that is none.
    wrong = {"map_crops": str(trained / "models" / "ldm_unconditional" / "model"), "unconditional": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"it is a unconditional model, not map_crops") as err:
        _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(trained / "clusters")}, ldm={"models": wrong}).check_reuse()
    assert "no model_index.json" in str(err.value)
    # A variant that is not evaluated.
    with pytest.raises(ConfigError, match=r"\['map'\] not among the evaluated variants"):
        _cohort(tmp_path, clustering={"k": K, "levels": [K, 2], "model": str(trained / "clusters")},
                ldm={"models": {"map": models}}).check_reuse()


def test_cluster_model_with_another_k_is_refused(tmp_path, trained):
    with pytest.raises(ConfigError, match=r"has k=4 tissue types but clustering.k is 8"):
        _cohort(tmp_path, clustering={"k": 8, "levels": [8, 2], "model": str(trained / "clusters")}).check_reuse()


def test_synthesis_refuses_maps_of_another_label_space(tmp_path, trained):
    """The job-time check: the maps a dataset holds, against the pipeline's record."""
    folder = trained / "models" / "ldm_map_crops" / "model"
    space = pipeline_label_space(pipeline_record(folder))
    model = ClusterModel.load(trained / "clusters")
    same = {"source": "kmeans", "num_labels": K + 1, "label_names": model.label_names(), "cluster_model_id": model.model_id}
    check_dataset(space, same, folder, tmp_path / "patches.zarr")
    with pytest.raises(HistopipeError, match=r"patches.zarr: .*cluster model"):
        check_dataset(space, {**same, "cluster_model_id": "0123456789abcdef"}, folder, tmp_path / "patches.zarr")
    with pytest.raises(HistopipeError, match=r"5 vs 3 labels"):
        check_dataset(space, {"source": "kmeans", "num_labels": 3}, folder, "patches.zarr")
    with pytest.raises(HistopipeError, match=r"label source kmeans vs annotation"):
        check_dataset(space, {"source": "annotation", "num_labels": 5}, folder, "patches.zarr")
