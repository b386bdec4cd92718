"""DeepLabv3+ downstream evaluation: scores from a confusion matrix, weights, a tiny training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from histopipe.errors import HistopipeError, WeightsError
from histopipe.evaluation.segmentation import (
    build_model,
    evaluate_segmentation,
    segmentation_scores,
)
from histopipe.evaluation.settings import EvaluationSettings, SegmentationSettings
from tests.evaluation_helpers import (
    one_thread,
    run_cli,
    toy_patches,
    write_patch_store,
    write_synthetic_store,
)


@pytest.fixture
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    images, maps = toy_patches(24, 64, rng)
    split = np.array([0] * 14 + [1] * 2 + [2] * 8)  # train / val / test, as split by slide
    real = write_patch_store(root / "patches.zarr", images, maps, split)
    syn_images, syn_maps = toy_patches(12, 64, np.random.default_rng(1))
    syn = write_synthetic_store(root / "synthetic.zarr", syn_images, syn_maps, "map_crops")
    return real, syn, maps[split == 2]


def tiny(steps=40, **seg):
    params = dict(steps=steps, batch_size=4, lr=3e-3, num_workers=0) | seg
    return EvaluationSettings(device="cpu", seed=0, segmentation=SegmentationSettings(**params))


# Rows = true label, columns = predicted.
CONFUSION = np.array([[50, 2, 3],
                      [4, 30, 6],
                      [1, 9, 20]])


def test_scores_of_a_hand_built_confusion_matrix():
    s = segmentation_scores(CONFUSION, ignore_background=False, label_names=["bg", "a", "b"])
    # class 0: TP 50, FP 4+1, FN 2+3; class 1: TP 30, FP 2+9, FN 4+6; class 2: TP 20, FP 3+6, FN 1+9
    iou = [50 / 60, 30 / 51, 20 / 39]
    dice = [100 / 110, 60 / 81, 40 / 59]
    assert [c["iou"] for c in s["per_class"]] == pytest.approx(iou)
    assert [c["dice"] for c in s["per_class"]] == pytest.approx(dice)
    assert [c["name"] for c in s["per_class"]] == ["bg", "a", "b"]
    assert [c["support"] for c in s["per_class"]] == [55, 40, 30]
    assert s["miou"] == pytest.approx(np.mean(iou))
    assert s["mdice"] == pytest.approx(np.mean(dice))
    assert s["pixel_accuracy"] == pytest.approx(100 / 125)


def test_background_row_and_column_are_dropped_when_ignored():
    s = segmentation_scores(CONFUSION, ignore_background=True)
    # Without label 0: class 1 TP 30, FP 9, FN 6; class 2 TP 20, FP 6, FN 9.
    assert [c["label"] for c in s["per_class"]] == [1, 2]
    assert [c["iou"] for c in s["per_class"]] == pytest.approx([30 / 45, 20 / 35])
    assert s["pixel_accuracy"] == pytest.approx(50 / 65)


def test_absent_classes_are_not_averaged_but_false_positives_count():
    conf = np.zeros((4, 4), int)
    conf[1, 1] = 10  # class 1 perfect
    conf[2, 3] = 5  # class 2 always predicted as 3; class 3 never present
    s = segmentation_scores(conf, ignore_background=True)
    iou = {c["label"]: c["iou"] for c in s["per_class"]}
    assert iou[1] == 1.0 and iou[2] == 0.0 and iou[3] == 0.0
    assert s["miou"] == pytest.approx(1 / 3)
    conf[2, 3] = 0
    s = segmentation_scores(conf, ignore_background=True)
    assert np.isnan(s["per_class"][1]["iou"]) and s["miou"] == 1.0 and s["n_classes_scored"] == 1


@pytest.mark.slow
def test_tiny_deeplab_learns_a_separable_task(stores, single_thread):
    real, _, test_maps = stores
    result = evaluate_segmentation("real", real, None, tiny())
    # Chance (random labels over two tissue classes) gives an mIoU near 1/3.
    assert result["miou"] > 0.75, result["per_class"]
    assert result["train"]["n_patches"] == 14 and result["test"]["n_used"] == 8
    conf = np.array(result["confusion"])
    assert conf.sum() == (test_maps != 0).sum()  # every tissue pixel scored once, at 64 px
    assert conf[0].sum() == conf[:, 0].sum() == 0  # background neither scored nor predicted
    losses = [loss for _, loss in result["loss_curve"]]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_resized_training_and_pooled_sources(stores, single_thread):
    real, syn, test_maps = stores
    result = evaluate_segmentation("both", real, syn, tiny(steps=3, image_size=32))
    assert result["network_size"] == 32 and result["patch_size"] == 64
    assert result["train"]["n_patches"] == 14 + 12
    assert result["variant"] == "map_crops" and result["mode"] == "both"
    # Scored at the maps' own 64 px resolution.
    assert np.array(result["confusion"]).sum() == (test_maps != 0).sum()


def test_synthetic_labels_outside_the_label_space_are_refused(stores, tmp_path):
    real, _, _ = stores
    images, maps = toy_patches(4, 64, np.random.default_rng(2))
    maps[:, :4, :4] = 7
    bad = write_synthetic_store(tmp_path / "bad.zarr", images, maps, "map")
    with pytest.raises(HistopipeError, match="label"):
        evaluate_segmentation("synthetic", real, bad, tiny(steps=2))
    with pytest.raises(HistopipeError, match="needs a synthetic store"):
        evaluate_segmentation("synthetic", real, None, tiny(steps=2))


def test_encoder_weights_from_a_torchvision_checkpoint(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    # Wrapped as many training scripts save it: {"state_dict": {"module.<name>": ...}}.
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model, sha = build_model(SegmentationSettings(encoder_weights=str(path)), num_classes=3)
    assert len(sha) == 64
    assert torch.equal(model.encoder.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)

    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match="same architecture"):
        build_model(SegmentationSettings(encoder_weights=str(wrong)), num_classes=3)
    with pytest.raises(WeightsError, match="not found"):
        build_model(SegmentationSettings(encoder_weights=str(tmp_path / "none.pth")), 3)


@pytest.mark.slow
def test_cli_writes_scores_json(stores, tmp_path):
    real, syn, _ = stores
    config = tmp_path / "config.yaml"
    config.write_text(
        "evaluation:\n  device: cpu\n  seed: 1\n"
        "  segmentation: {steps: 2, batch_size: 2, num_workers: 1, image_size: 32}\n"
    )
    out = tmp_path / "out" / "seg.json"
    run_cli("evaluate-segmentation", "--train-real", real, "--train-synthetic", syn,
            "--mode", "synthetic", "--config", config, "--seed", "5", "--out", out)
    result = json.loads(out.read_text())
    assert result["kind"] == "segmentation" and result["mode"] == "synthetic"
    assert result["seed"] == 5 and result["settings"]["steps"] == 2
    assert result["train"]["real"] is None and result["train"]["synthetic"]["n_used"] == 12
    assert 0.0 <= result["miou"] <= 1.0
    assert not list(out.parent.glob(".*.partial"))

    proc = run_cli("evaluate-segmentation", "--train-real", real, "--mode", "synthetic",
                   "--out", tmp_path / "x.json", check=False)
    assert proc.returncode == 2 and "needs a synthetic store" in proc.stderr
