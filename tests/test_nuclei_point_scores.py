"""Point placement scores of the nuclei model: synthesised nuclei matched to the requested
points (Hungarian matching within a radius), F1 and class accuracy; the same scores are the
nuclei model's progress evaluations."""

from __future__ import annotations

import numpy as np
import pytest

from histopipe.nuclei.metrics import PointScores


def test_point_scores_match_within_the_radius():
    scores = PointScores(radius=6)
    requested = np.array([[10, 10, 1], [30, 30, 2], [50, 50, 3]])
    found = np.array([[12, 14, 1], [30, 37, 2], [51, 50, 1], [5, 60, 2]])  # 4.5 px, 7 px, 1 px, none
    scores.update(requested, found)
    r = scores.result()
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 1)
    assert r["f1"] == pytest.approx(4 / 7) and r["class_accuracy"] == pytest.approx(0.5)
    scores.update(np.zeros((0, 3)), np.zeros((0, 3)))  # an empty image changes nothing
    assert scores.result()["f1"] == pytest.approx(4 / 7)
