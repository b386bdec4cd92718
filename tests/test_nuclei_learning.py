"""The nuclei model learns what it is for: trained for a minute or two on constructed discs,
it draws nuclei on the requested points, of the requested classes, for point maps it has not
seen; its progress evaluations say so while it trains. Fails for a model that ignores its
point map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histopipe.diffusion.training import read_progress, train
from histopipe.nuclei.labels import centroids, points_from_raster
from histopipe.nuclei.metrics import PointScores
from histopipe.nuclei.tasks import JointTask
from tests.nuclei_model_helpers import (
    CLASS_NAMES,
    TISSUE_NAMES,
    DiscDataset,
    disc_item,
    tiny_model,
    tiny_train,
)
from tests.quality_helpers import threads


class HeldOut(torch.utils.data.Dataset):
    """Disc items the model never trains on (other seeds)."""

    def __init__(self, n: int):
        self.items = [disc_item(10_000 + i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


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


@pytest.mark.slow
def test_nuclei_land_on_the_requested_points_with_their_classes(tmp_path):
    from histopipe.diffusion.tasks import reference_batch

    held_out = HeldOut(16)
    m = tiny_model(timesteps=200)
    s = tiny_train(batch_size=16, max_steps=400, lr=2e-3, lr_schedule="cosine", warmup_steps=20, ema_decay=0.99,
                   eval_every=200, eval_samples=16, sample_steps=20, augment_flip=True)
    task = JointTask(m, s, CLASS_NAMES, TISSUE_NAMES, reference_batch(held_out, 16))
    with threads(2):
        train(task, DiscDataset(256), s, tmp_path)
        pipe = task.pipeline(task.model.eval())
        ref = reference_batch(held_out, 16)
        gens = [torch.Generator().manual_seed(i) for i in range(16)]
        out = pipe(ref["points"], ref["tissue"], num_inference_steps=20, generator=gens, instance_method="watershed")
    scores = PointScores(radius=6)
    for i in range(16):
        scores.update(points_from_raster(out.points[i]), centroids(out.instances[i], out.semantic[i]))
    result = scores.result()
    assert result["f1"] >= 0.8, result
    assert result["class_accuracy"] >= 0.8, result
    # The same measure, logged while training, rose to about the same value.
    progress = read_progress(tmp_path)
    assert [p["step"] for p in progress] == [200, 400]
    assert progress[-1]["f1"] >= 0.7 and progress[-1]["f1"] >= progress[0]["f1"] - 0.05
    # Control: the same samples scored against other images' points do not match.
    shuffled = PointScores(radius=6)
    for i in range(16):
        shuffled.update(points_from_raster(out.points[(i + 1) % 16]), centroids(out.instances[i], out.semantic[i]))
    assert shuffled.result()["f1"] < 0.4
