"""Nuclei evaluation: metrics against hand-computed values, the downstream segmenter, the
real vs real + synthetic arms, FD and the written tables, rare-class selection."""

from __future__ import annotations

import numpy as np
import pytest

from histopipe.nuclei.metrics import (
    NucleiScores,
    aji_terms,
    classes_of,
    match_instances,
    overlaps,
    score_image,
)

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


def test_classes_of_takes_the_majority_label():
    semantic = np.zeros((6, 6), np.uint8)
    semantic[0:3, 0:3] = 1
    semantic[0, 0:2] = 2  # 2 of 9 pixels of nucleus 1 disagree
    semantic[3:5, 3:5] = 2
    assert classes_of(TRUE, semantic) == {1: 1, 2: 2, 3: 0}
