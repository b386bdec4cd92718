"""The nuclei branch end to end on real stores, with tiny models on CPU: a CoNIC folder →
``build_nuclei_store`` → ``train_nuclei`` → ``fit_layout`` → ``synthesize_nuclei`` (held-out
point maps, and cell-type counts) → ``evaluate_nuclei``. Checks the seams between the parts
(store arrays and attrs, item layout, instance separation), not the models' quality."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from histopipe.config import load_config
from histopipe.nuclei.dataset import NucleiDataset
from histopipe.nuclei.evaluate import evaluate_nuclei
from histopipe.nuclei.labels import CONIC_CLASSES, points_from_raster
from histopipe.nuclei.layout import LayoutModel, fit_layout
from histopipe.nuclei.sheet import NucleiSource
from histopipe.nuclei.store import NucleiDataSettings, build_nuclei_store, store_info
from histopipe.nuclei.synthesis import synthesize_nuclei
from histopipe.nuclei.training import train_nuclei
from tests.diffusion_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.nuclei_helpers import write_conic
from tests.nuclei_model_helpers import tiny_model, tiny_train

PATCH = 32
COUNTS = {"neutrophil": 3, "epithelial": 5}


def _config() -> dict:
    # Through json, as YAML would give them (lists, not tuples).
    model = json.loads(json.dumps(dataclasses.asdict(tiny_model(image_size=PATCH))))
    train = json.loads(json.dumps(dataclasses.asdict(tiny_train(max_steps=3))))
    return load_config(None, {"nuclei": {
        "data": {"patch_size": PATCH, "test_fraction": 0.34},
        "model": model,
        "train": train,
        "synthesis": {"steps": 2, "batch_size": 4, "num_images": 2},
        "evaluation": {"device": "cpu", "batch_size": 8,
                       "segmentation": {"encoder_depth": 3, "steps": 3, "batch_size": 4, "num_workers": 0}},
    }})


def _check_items(dataset: NucleiDataset) -> None:
    """Tensor layout of the items, and instances, semantic and points telling one story."""
    k = len(CONIC_CLASSES)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (3, PATCH, PATCH) and -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["distance"].shape == (1, PATCH, PATCH) and -1 <= item["distance"].min() and item["distance"].max() <= 1
        inst, sem, pts = item["instances"], item["semantic"], item["points"]
        assert inst.dtype == sem.dtype == pts.dtype == torch.int64
        assert 0 <= int(sem.min()) and int(sem.max()) < k
        assert torch.equal(sem > 0, inst > 0)
        n = int(inst.max())
        assert sorted(inst.unique().tolist()) == list(range(n + 1))  # ids 1..n
        rows = points_from_raster(pts.numpy())
        assert len(rows) == n  # one centroid per nucleus, on its own nucleus, of its class
        assert sorted(inst[rows[:, 0], rows[:, 1]].tolist()) == list(range(1, n + 1))
        assert (sem[rows[:, 0], rows[:, 1]].numpy() == rows[:, 2]).all()


def _manifest(folder) -> list[dict]:
    with open(folder / "manifest.tsv") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.slow
def test_nuclei_branch_end_to_end(tmp_path):
    cfg = _config()
    write_conic(tmp_path / "conic", n=6, size=2 * PATCH, seed=0, sources=3)
    source = NucleiSource("conic", "conic", tmp_path / "conic", split="auto", tissue="colon")
    store = build_nuclei_store([source], tmp_path / "real.zarr", NucleiDataSettings.from_config(cfg))
    info = store_info(store)
    # 6 images of 64 px → 24 patches of 32 px; one source image of three (2 images) is test.
    assert info["splits"] == {"train": 16, "test": 8} and info["tissues"] == {"colon": 24}
    assert info["class_names"] == list(CONIC_CLASSES) and info["patch_size"] == PATCH
    real_test = NucleiDataset(store, split="test")
    _check_items(real_test)

    model_dir = train_nuclei(cfg, store, tmp_path / "train")
    assert (model_dir / "model_index.json").is_file()
    layout = fit_layout(store, tmp_path / "layout.json")
    assert LayoutModel.load(layout).tissue_names == ["colon"]

    # Held-out mode: one synthetic patch per real test point map, in Part A's store format.
    held = synthesize_nuclei(cfg, model_dir, store, tmp_path / "held")
    rows = _manifest(held)
    assert [r["name"] for r in rows] == [f"test{i:06d}_0" for i in real_test.indices]
    for r, i in zip(rows, range(len(real_test)), strict=True):  # the layout asked for is the test map
        per_class = np.bincount(real_test[i]["points"].numpy().ravel(), minlength=len(CONIC_CLASSES))[1:]
        assert [int(r[f"n_{c}"]) for c in CONIC_CLASSES[1:]] == per_class.tolist()
    syn_info = store_info(held / "nuclei.zarr")
    assert syn_info["splits"] == {"train": 8, "test": 0} and syn_info["tissues"] == {"colon": 8}
    assert syn_info["class_names"] == info["class_names"]
    synthetic = NucleiDataset(held / "nuclei.zarr", split=None)
    _check_items(synthetic)
    assert [int(synthetic[i]["instances"].max()) for i in range(8)] == [int(r["nuclei"]) for r in rows]

    # Counts mode: layouts from the layout model honour the requested counts exactly.
    counted = synthesize_nuclei(cfg, model_dir, store, tmp_path / "counts", counts="neutrophil=3,epithelial=5",
                                tissue="colon", layout=layout)
    rows = _manifest(counted)
    assert len(rows) == 2
    for r in rows:
        assert r["tissue"] == "colon" and r["source"] == "counts"
        assert {c: int(r[f"n_{c}"]) for c in CONIC_CLASSES[1:] if int(r[f"n_{c}"])} == COUNTS
    _check_items(NucleiDataset(counted / "nuclei.zarr", split=None))

    result = evaluate_nuclei(cfg, store, held / "nuclei.zarr", tmp_path / "eval")
    with open(tmp_path / "eval" / "metrics.tsv") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    assert list(table[0]) == [
        "arm", "n_train_real", "n_train_synthetic", "n_test", "seed", "steps", "dice", "aji", "pq", "dq", "sq",
        "f1_detection", "accuracy", *(f"f1_{c}" for c in CONIC_CLASSES[1:]), "f1_rare_mean", "fd_efficientnet_lite0",
    ]
    assert [r["arm"] for r in table] == ["real", "real_synthetic", "gain"]
    real, mixed = table[0], table[1]
    assert (real["n_train_real"], real["n_train_synthetic"], real["n_test"]) == ("16", "0", "8")
    assert (mixed["n_train_synthetic"], mixed["steps"]) == ("8", "3")
    # The real test split has nuclei, so Dice and AJI are defined whatever the segmenter predicts.
    for row in (real, mixed):
        for c in ("dice", "aji"):
            assert 0 <= float(row[c]) <= 1, (row["arm"], c)
    fd = float(mixed["fd_efficientnet_lite0"])
    assert math.isfinite(fd) and fd > 0 and real["fd_efficientnet_lite0"] == ""
    assert result["arms"]["real"]["n_images"] == 8 and result["n_synthetic"] == 8
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sources"]["real_store"] == str(store)
