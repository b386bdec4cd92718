"""Nuclei evaluation: metrics against hand-computed values, the downstream segmenter, the
real vs real + synthetic arms, FD and the written tables, rare-class selection."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from histopipe.config import load_config
from histopipe.errors import ConfigError
from histopipe.evaluation.distribution import registry_factory
from histopipe.nuclei.evaluate import (
    DatasetImages,
    NucleiEvaluationSettings,
    class_counts,
    evaluate_datasets,
    frechet_distances,
    load_settings,
    select_rare,
)
from histopipe.nuclei.labels import instance_classes
from histopipe.nuclei.metrics import (
    NucleiScores,
    aji_terms,
    match_instances,
    overlaps,
    score_image,
)
from histopipe.nuclei.segmentation import (
    SegmenterSettings,
    build_segmenter,
    evaluate_segmenter,
    run_arms,
    train_segmenter,
)
from tests.evaluation_helpers import one_thread, tiny_factory
from tests.nuclei_eval_helpers import CLASS_NAMES, disc_dataset

# True map: nucleus 1 = 9 px (rows 0-2, cols 0-2), nucleus 2 = 4 px (rows 3-4, cols 3-4),
# nucleus 3 = 2 px (row 5, cols 0-1).
TRUE = np.array([
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 0, 0, 2, 2, 0],
    [0, 0, 0, 2, 2, 0],
    [3, 3, 0, 0, 0, 0],
], np.int32)
# Prediction: 7 = 8 px inside nucleus 1 (IoU 8/9); 5 = 2 px inside nucleus 2 (IoU 2/4 = 0.5,
# which is not > 0.5, so unmatched); 9 = 2 px over background (a false positive).
PRED = np.array([
    [7, 7, 7, 0, 0, 0],
    [7, 7, 7, 0, 0, 0],
    [7, 7, 0, 0, 0, 0],
    [0, 0, 0, 5, 0, 0],
    [0, 0, 0, 5, 0, 9],
    [0, 0, 0, 0, 0, 9],
], np.int32)
TRUE_CLASSES = {1: 1, 2: 2, 3: 2}
PRED_CLASSES = {7: 1, 5: 2, 9: 1}


def test_overlaps_and_matching_of_a_hand_built_pair():
    ov = overlaps(TRUE, PRED)
    assert ov.true_ids.tolist() == [1, 2, 3] and ov.pred_ids.tolist() == [5, 7, 9]
    assert ov.true_area.tolist() == [9, 4, 2] and ov.pred_area.tolist() == [2, 8, 2]
    assert ov.intersection.tolist() == [[0, 8, 0], [2, 0, 0], [0, 0, 0]]
    m = match_instances(TRUE, PRED)
    # Only (1, 7) has IoU > 0.5; (2, 5) has exactly 0.5 and stays unmatched.
    assert m.pairs.tolist() == [[1, 7]] and m.iou == pytest.approx([8 / 9])
    assert m.unmatched_true.tolist() == [2, 3] and m.unmatched_pred.tolist() == [5, 9]


def test_scores_of_one_image_by_hand():
    acc = NucleiScores(num_classes=3)
    acc.update(TRUE, TRUE_CLASSES, PRED, PRED_CLASSES)
    r = acc.result(["background", "a", "b"])
    # Dice: |T| = 15, |P| = 12, |T ∩ P| = 8 + 2 = 10 -> 20 / 27.
    assert r["dice"] == pytest.approx(20 / 27)
    # AJI: nucleus 1 -> pred 7 (I 8, U 9); 2 -> pred 5 (I 2, U 4); 3 overlaps nothing (U += 2);
    # pred 9 chosen by no one (U += 2): (8 + 2) / (9 + 4 + 2 + 2) = 10 / 17.
    assert r["aji"] == pytest.approx(10 / 17)
    # TP 1, FP 2 (5, 9), FN 2 (2, 3): DQ = 1 / (1 + 1 + 1); SQ = 8/9; PQ = 8/27.
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 2)
    assert r["dq"] == pytest.approx(1 / 3) and r["f1_detection"] == pytest.approx(1 / 3)
    assert r["sq"] == pytest.approx(8 / 9) and r["pq"] == pytest.approx(8 / 27)
    # Class a: the pair (1 -> 7) is TP_a; unmatched pred 9 is FP_d,a: 2*1 / (2*1 + 1) = 2/3.
    # Class b: the pair is TN_b; FP_d,b = 1 (pred 5), FN_d,b = 2 (true 2, 3): 2 / (2 + 1 + 2).
    assert r["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert r["per_class"]["b"]["f1"] == pytest.approx(2 / 5)
    assert r["per_class"]["a"]["n_true"] == 1 and r["per_class"]["b"]["n_true"] == 2
    assert r["accuracy"] == 1.0


def test_scores_accumulate_over_images():
    acc = NucleiScores(num_classes=3)
    acc.update(TRUE, TRUE_CLASSES, PRED, PRED_CLASSES)
    # Second image: one class-b nucleus of 4 px predicted exactly.
    second = np.zeros((6, 6), np.int32)
    second[1:3, 1:3] = 4
    acc.update(second, {4: 2}, second * 2, {8: 2})
    r = acc.result(["background", "a", "b"])
    # Dice (2*(10 + 4)) / (27 + 8) = 28/35; AJI (10 + 4) / (17 + 4) = 2/3.
    assert r["dice"] == pytest.approx(28 / 35) and r["aji"] == pytest.approx(2 / 3)
    # TP 2, FP 2, FN 2: DQ 1/2; SQ (8/9 + 1) / 2 = 17/18; PQ 17/36.
    assert r["dq"] == pytest.approx(0.5) and r["pq"] == pytest.approx(17 / 36)
    # Class a: TP 1, TN 1 (the b pair), FP_d 1: 4 / (4 + 1). Class b: TP 1, TN 1, FP_d 1,
    # FN_d 2: 4 / (4 + 3).
    assert r["per_class"]["a"]["f1"] == pytest.approx(4 / 5)
    assert r["per_class"]["b"]["f1"] == pytest.approx(4 / 7)
    assert r["n_images"] == 2


def test_misclassified_pairs_count_twice_in_class_f1():
    acc = NucleiScores(num_classes=3)
    acc.update(TRUE, TRUE_CLASSES, PRED, {7: 2, 5: 2, 9: 1})
    r = acc.result()
    # Pair (1 -> 7) is now FN_1 and FP_2. Class 1: 0 / (0 + 2*1 + FP_d 1) = 0.
    # Class 2: 0 / (0 + 2*1 + FP_d 1 + FN_d 2) = 0. Accuracy 0 / 1.
    assert r["per_class"]["1"]["f1"] == 0.0 and r["per_class"]["2"]["f1"] == 0.0
    assert r["accuracy"] == 0.0


def test_aji_charges_a_merged_prediction_twice():
    true = np.zeros((6, 6), np.int32)
    true[0, 0:3], true[0, 3:6] = 1, 2
    pred = np.zeros((6, 6), np.int32)
    pred[0, :] = 1
    # Both nuclei choose the merged pred (I 3, U 6 each): AJI = 6/12; IoU 0.5 is no match.
    assert aji_terms(overlaps(true, pred)) == (6, 12)
    r = score_image(true, (true > 0).astype(np.uint8), pred, (pred > 0).astype(np.uint8), 2)
    assert r["aji"] == pytest.approx(0.5) and r["pq"] == 0.0 and r["tp"] == 0


def test_perfect_prediction_scores_one_and_ids_do_not_matter():
    semantic = np.vectorize(lambda i: TRUE_CLASSES.get(int(i), 0))(TRUE).astype(np.uint8)
    r = score_image(TRUE, semantic, TRUE, semantic, 3)
    for key in ("dice", "aji", "pq", "dq", "sq", "f1_detection", "accuracy"):
        assert r[key] == pytest.approx(1.0), key
    assert all(c["f1"] == pytest.approx(1.0) for c in r["per_class"].values())
    # Renumbering the predicted (or true) instances changes nothing.
    perm = np.array([0, 9, 4, 7])
    swapped = score_image(TRUE, semantic, perm[TRUE], semantic, 3)
    assert swapped == r
    a = score_image(TRUE, semantic, PRED, semantic, 3)
    b = score_image(perm[TRUE], semantic, PRED + (PRED > 0) * 100, semantic, 3)
    assert a == b


def test_empty_prediction_scores_zero_and_nothing_is_undefined():
    semantic = (TRUE > 0).astype(np.uint8)
    empty = np.zeros_like(TRUE)
    r = score_image(TRUE, semantic, empty, empty, 2)
    assert r["dice"] == 0.0 and r["aji"] == 0.0 and r["pq"] == 0.0 and r["f1_detection"] == 0.0
    assert r["fn"] == 3 and r["per_class"]["1"]["f1"] == 0.0
    assert np.isnan(r["accuracy"])  # no matched pair to classify
    nothing = score_image(empty, empty, empty, empty, 2)
    assert np.isnan(nothing["dice"]) and np.isnan(nothing["aji"]) and np.isnan(nothing["pq"])


def test_instance_classes_are_the_majority_label_the_scores_assume():
    semantic = np.zeros((6, 6), np.uint8)
    semantic[0:3, 0:3] = 1
    semantic[0, 0:2] = 2  # 2 of 9 pixels of nucleus 1 disagree
    semantic[3:5, 3:5] = 2
    assert instance_classes(TRUE, semantic) == {1: 1, 2: 2, 3: 0}


# ---------------------------------------------------------------- segmenter, arms, tables

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def tiny_seg(steps: int, **kw) -> SegmenterSettings:
    return SegmenterSettings(**({"encoder_depth": 3, "steps": steps, "batch_size": 4, "lr": 3e-3,
                                 "num_workers": 0} | kw))


def test_segmenter_overfits_a_tiny_training_set():
    train = disc_dataset(8, 32, seed=0)
    settings = tiny_seg(150)
    torch.manual_seed(0)
    model, sha = build_segmenter(settings, len(CLASS_NAMES))
    logits, distance = model(torch.stack([train[0]["image"]]))
    assert logits.shape == (1, 4, 32, 32) and distance.shape == (1, 1, 32, 32) and sha is None
    curve = train_segmenter(model, [train], len(CLASS_NAMES), settings, seed=0, device=CPU)
    assert curve[-1][0] == 150 and curve[-1][1] < curve[0][1] / 5
    r = evaluate_segmenter(model, train, len(CLASS_NAMES), settings, CPU, CLASS_NAMES)
    # Chance: calling every pixel nucleus gives Dice 2f / (1 + f) for foreground share f.
    f = np.mean([float((s["instances"] > 0).float().mean()) for s in train])
    assert r["dice"] > max(0.85, 2 * f / (1 + f) + 0.4)
    assert r["aji"] > 0.7 and r["f1_detection"] > 0.8 and r["accuracy"] > 0.8
    assert r["n_images"] == 8


def test_rare_classes_by_share_or_by_name():
    train = disc_dataset(12, 32, seed=3)
    counts = class_counts(train, 4)
    expected = np.bincount(np.concatenate([s["semantic"][s["points"] > 0].numpy() for s in train]), minlength=4)
    assert counts.tolist() == expected.tolist() and counts[0] == 0
    hand = np.array([0, 50, 45, 5])  # shares 0.50, 0.45, 0.05
    r = select_rare(hand, CLASS_NAMES, 0.1)
    assert r["classes"] == [3] and r["names"] == ["neutrophil"] and r["n_nuclei"] == 100
    assert r["shares"]["epithelial"] == pytest.approx(0.45)
    assert select_rare(hand, CLASS_NAMES, 0.5)["classes"] == [2, 3]
    assert select_rare(hand, CLASS_NAMES, 0.1, explicit=["epithelial", 1])["classes"] == [1, 2]
    with pytest.raises(ConfigError, match="rare_classes"):
        select_rare(hand, CLASS_NAMES, 0.1, explicit=["macrophage"])


def test_settings_come_from_the_config_section():
    cfg = load_config(None, {"nuclei": {"evaluation": {"rare_classes": ["neutrophil"],
                                                       "segmentation": {"steps": 7}}}})
    s = load_settings(cfg)
    assert s.rare_classes == ("neutrophil",) and s.segmentation.steps == 7
    assert s.encoders == ("efficientnet_lite0",) and s == load_settings(cfg)
    with pytest.raises(ConfigError, match="instance_method"):
        SegmenterSettings(instance_method="marker")


def test_fd_in_the_registry_encoder_tells_off_colours_apart():
    real = disc_dataset(12, 32, seed=10)
    off_colours = {1: (30, 120, 60), 2: (200, 200, 40), 3: (0, 0, 0)}
    settings = NucleiEvaluationSettings(device="cpu", batch_size=12)
    encoder = registry_factory("efficientnet_lite0", device="cpu")  # built once, not per call

    def fd(a, b):
        return frechet_distances(DatasetImages(a, "a"), DatasetImages(b, "b"), settings,
                                 encoder_factory=lambda *_, **__: encoder)

    # Each FD in 1,280 dimensions costs seconds of linear algebra: two are enough here
    # (FD of a set with itself is covered in test_evaluation_frechet).
    other = fd(real, disc_dataset(12, 32, seed=11))
    off = fd(real, disc_dataset(12, 32, seed=11, colours=off_colours))
    assert off["efficientnet_lite0"]["fd"] > 1.5 * other["efficientnet_lite0"]["fd"] > 0
    assert other["efficientnet_lite0"]["n_real"] == 12 and other["efficientnet_lite0"]["dim"] == 1280


def test_dataset_images_round_trip_to_uint8_and_subsample():
    data = disc_dataset(5, 32, seed=4)
    images = DatasetImages(data, "x", max_samples=3, seed=1)
    batches = list(images.batches(2))
    assert len(images) == 3 and [b.shape for b in batches] == [(2, 32, 32, 3), (1, 32, 32, 3)]
    row = int(images.rows[0])
    back = batches[0][0].astype(np.float32) / 127.5 - 1
    assert np.abs(back - data[row]["image"].permute(1, 2, 0).numpy()).max() < 1e-5


def test_arms_write_the_table_with_every_column(tmp_path):
    # Training set short of neutrophils; the synthetic set has plenty.
    real_train = disc_dataset(6, 32, seed=20, class_probs=(0.55, 0.42, 0.03))
    synthetic = disc_dataset(6, 32, seed=21, class_probs=(0.3, 0.3, 0.4))
    test = disc_dataset(4, 32, seed=22)
    settings = NucleiEvaluationSettings(encoders=("tiny_a", "tiny_b"), device="cpu", batch_size=8,
                                        segmentation=tiny_seg(12))
    result = evaluate_datasets(settings, real_train, test, synthetic, CLASS_NAMES, tmp_path,
                               encoder_factory=tiny_factory)
    assert set(result["arms"]) == {"real", "real_synthetic"}
    assert result["arms"]["real"]["n_train_synthetic"] == 0
    assert result["arms"]["real_synthetic"]["n_train_synthetic"] == 6
    assert result["n_real_test"] == 4 and result["seed"] == 0
    assert result["encoders"] == ["tiny_a", "tiny_b"] and set(result["fd"]) == {"tiny_a", "tiny_b"}
    counts = result["train_class_counts"]
    assert result["rare"]["names"] == [n for n in CLASS_NAMES[1:] if counts[n] < 0.1 * sum(counts.values())]
    assert "neutrophil" in result["rare"]["names"]
    gain = result["rare"]["per_class"]["neutrophil"]
    assert gain["gain"] == pytest.approx(gain["f1_real_synthetic"] - gain["f1_real"])

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rare"]["names"] == result["rare"]["names"]
    with open(tmp_path / "metrics.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    columns = ["arm", "n_train_real", "n_train_synthetic", "n_test", "seed", "steps", "dice", "aji", "pq",
               "dq", "sq", "f1_detection", "accuracy", "f1_lymphocyte", "f1_epithelial", "f1_neutrophil",
               "f1_rare_mean", "fd_tiny_a", "fd_tiny_b"]
    assert list(rows[0]) == columns
    assert [r["arm"] for r in rows] == ["real", "real_synthetic", "gain"]
    assert rows[0]["fd_tiny_a"] == "" and float(rows[1]["fd_tiny_a"]) > 0
    for c in ("dice", "aji", "pq"):
        a, b = float(rows[0][c]), float(rows[1][c])
        assert float(rows[2][c]) == pytest.approx(b - a, abs=1e-5)
    md = (tmp_path / "metrics.md").read_text().splitlines()
    assert md[0].startswith("| arm |") and len(md) == 5
    assert not list(tmp_path.glob(".*partial"))


def test_the_real_arm_does_not_depend_on_the_synthetic_set():
    real_train, test = disc_dataset(4, 32, seed=30), disc_dataset(2, 32, seed=31)
    settings = tiny_seg(6)
    alone = run_arms(real_train, None, test, 4, settings, 0, CPU, CLASS_NAMES)
    both = run_arms(real_train, disc_dataset(4, 32, seed=32), test, 4, settings, 0, CPU, CLASS_NAMES)
    assert set(alone) == {"real"}
    assert alone["real"]["loss_curve"] == both["real"]["loss_curve"]
    assert alone["real"]["dice"] == both["real"]["dice"]
