"""Label fidelity (does an image follow its map?), crop fidelity (does it use its crops?), and
the table's n/a cells for metrics that cannot be computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from histopipe.cropbank import build_crop_bank
from histopipe.errors import HistopipeError
from histopipe.evaluation.ablation import assemble, to_markdown
from histopipe.evaluation.distribution import evaluate_distribution
from histopipe.evaluation.features import ImageSet
from histopipe.evaluation.fidelity import (
    BankByType,
    CropPair,
    crop_fidelity,
    crop_pairs,
    label_fidelity,
    nearest_square,
)
from histopipe.evaluation.segmentation import evaluate_segmentation, load_segmenter
from histopipe.evaluation.settings import EvaluationSettings, SegmentationSettings
from histopipe.patches import CropBankConfig
from tests.evaluation_helpers import (
    one_thread,
    run_cli,
    tiny_factory,
    toy_patches,
    write_patch_store,
)
from tests.quality_helpers import make_cohort, write_cohort


class ColourStats:
    """A feature encoder that sees colour only: the mean colour's offset from mid-grey (so that
    cosine similarity tells hues and shades apart)."""

    dim = 3

    def embed(self, images) -> torch.Tensor:
        return torch.tensor(np.array([np.asarray(im, float).reshape(-1, 3).mean(0) - 128 for im in images]))


def test_nearest_square_is_the_largest_near_the_centroid():
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True  # a 6-px square
    mask[10:19, 5:19] = True  # a 9 × 14 block: the largest square has side 9
    y0, x0, side = nearest_square(mask, 4)
    assert side == 9 and mask[y0 : y0 + 9, x0 : x0 + 9].all()
    assert nearest_square(mask[:8, :8], 7) is None  # nothing of 7 px fits in the small square
    assert nearest_square(np.zeros((5, 5), bool), 1) is None


def _synthetic_store(path, images, maps, boxes, labels, valid, canvases, slides):
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    n, s = images.shape[:2]
    g.create_array("images", data=images, chunks=(1, s, s, 3))
    g.create_array("maps", data=maps.astype(np.uint16), chunks=(1, s, s))
    g.create_array("crop_canvas", data=canvases, chunks=(1, s, s, 3))
    g.create_array("crop_boxes", data=boxes)
    g.create_array("crop_labels", data=labels)
    g.create_array("crop_valid", data=valid)
    sid = g.create_array("slide_id", shape=(n,), dtype=str)
    sid[:] = slides
    g.attrs.update(variant="test", level=0)
    return g


def _canvases(images, boxes, valid):
    out = np.zeros_like(images)
    for i in range(len(images)):
        for k in np.flatnonzero(valid[i]):
            y0, x0, s = boxes[i, k]
            out[i, y0 : y0 + s, x0 : x0 + s] = images[i, y0 : y0 + s, x0 : x0 + s]
    return out


@pytest.fixture(scope="module")
def lite0():
    from histopipe.encoders import get_encoder

    return get_encoder("efficientnet_lite0")


@pytest.mark.parametrize("features", ["pooled", "appearance"])
def test_crop_fidelity_is_above_one_only_when_images_follow_their_crops(tmp_path, features, request):
    real = write_cohort(tmp_path / "patches.zarr", n=96, size=32)
    build_crop_bank(real, tmp_path / "bank.zarr", CropBankConfig(per_type=20, size=16, splits=("train",)))
    bank = BankByType(tmp_path / "bank.zarr")
    images, maps, boxes, labels, valid, _ = make_cohort(24, 32, seed=7)
    slides = np.array(["held-out"] * 24, dtype=object)
    # Images that follow their crops: the crops are cut from the images themselves.
    follows = _synthetic_store(tmp_path / "a.zarr", images, maps, boxes, labels, valid, _canvases(images, boxes, valid), slides)
    # Images that ignore them: each image got the crops of another image (same types where present).
    other = np.roll(np.arange(24), 1)
    ignored = _synthetic_store(tmp_path / "b.zarr", images, maps, boxes, labels, valid,
                               _canvases(images[other], boxes, valid), slides)
    # Pooled features of a colour-only encoder; appearance statistics of the real registry encoder.
    encoder = ColourStats() if features == "pooled" else request.getfixturevalue("lite0")
    result = {}
    with one_thread():
        for name, store in (("follows", follows), ("ignores", ignored)):
            pairs, skipped = crop_pairs(store, bank, min_side=6, seed=0)
            assert pairs and skipped["no_random_crop"] == 0
            result[name] = crop_fidelity(encoder, pairs, skipped, features)
    follows, ignores = result["follows"], result["ignores"]
    assert follows["features"] == features and follows["n_pairs"] == ignores["n_pairs"]
    assert follows["ratio"] > 1.02 and follows["ratio_outside"] > 1.01
    assert follows["ratio"] > ignores["ratio"] and follows["win"] > ignores["win"]
    assert ignores["ratio"] < 1.01
    if features == "appearance":
        # Distances: the own crop is nearer its region than a random crop of its type, for most pairs.
        assert follows["own"] < follows["random"] and follows["win"] > 0.6
        # The crops were cut from these images: in place they are the same pixels, no ratio.
        assert follows["ratio_in_place"] is None and "own pixels" in follows["reason_in_place"]
        assert follows["win_in_place"] == 1.0 and ignores["ratio_in_place"] > 0
    # No usable pair: a reason, not a crash or NaN.
    empty = crop_fidelity(encoder, [], {"small_region": 3, "no_random_crop": 0}, features)
    assert empty["ratio"] is None and "no conditioning crop" in empty["reason"]


def test_crop_fidelity_features_must_be_known_and_available():
    pair = CropPair(*(np.zeros((8, 8, 3), np.uint8) for _ in range(5)))
    with pytest.raises(HistopipeError, match="choose one of appearance, pooled"):
        crop_fidelity(ColourStats(), [pair], {}, "gram")
    with pytest.raises(HistopipeError, match="no appearance statistics"):
        crop_fidelity(ColourStats(), [pair], {}, "appearance")


def test_pooled_ratio_is_n_a_when_the_random_similarity_is_not_positive():
    # Crop and region red, the random crop of the type its opposite: cosine -1, so a ratio of
    # similarities would be negative. It is None with the reason, for the table's n/a.
    red, cyan = (np.full((8, 8, 3), c, np.uint8) for c in ((200, 128, 128), (56, 128, 128)))
    pair = CropPair(crop=red, random=cyan, region=red, in_place=red, outside=red)
    out = crop_fidelity(ColourStats(), [pair], {}, "pooled")
    assert out["ratio"] is None and "not positive" in out["reason"]
    assert out["ratio_outside"] is None and "not positive" in out["reason_outside"]
    assert out["win"] == 1.0  # the win rate stays: the region is nearer its own crop


@pytest.mark.slow
def test_label_fidelity_scores_images_against_their_maps(tmp_path):
    rng = np.random.default_rng(0)
    images, maps = toy_patches(48, 32, rng)
    real = write_patch_store(tmp_path / "p.zarr", images, maps, np.repeat([0, 2], [36, 12]))
    settings = EvaluationSettings(device="cpu", segmentation=SegmentationSettings(steps=60, batch_size=8, lr=1e-3, num_workers=0))
    with one_thread():
        arm = evaluate_segmentation("real", real, None, settings, model_out=tmp_path / "seg.pt")
        seg = load_segmenter(tmp_path / "seg.pt")
        test_images, test_maps = images[36:], maps[36:]
        right = label_fidelity(seg, test_images, test_maps, torch.device("cpu"))
        wrong = label_fidelity(seg, test_images, np.flip(test_maps, axis=2).copy(), torch.device("cpu"))
    # The saved segmenter scores the real test patches as the real arm did: the upper bound.
    assert right["miou"] == pytest.approx(arm["miou"], abs=1e-6) and right["miou"] > 0.7
    assert wrong["miou"] < right["miou"] - 0.2  # images that do not follow their maps score low
    with pytest.raises(HistopipeError, match="labels"):
        label_fidelity(seg, test_images, test_maps + 5, torch.device("cpu"))
    with pytest.raises(HistopipeError, match="segmenter file not found"):
        load_segmenter(tmp_path / "missing.pt")


def test_too_few_samples_give_n_a_with_a_reason_not_a_crash(tmp_path):
    rng = np.random.default_rng(0)
    images, maps = toy_patches(6, 32, rng)
    real = write_patch_store(tmp_path / "p.zarr", images, maps, np.array([2, 2, 2, 2, 2, 2]))
    syn = write_patch_store(tmp_path / "s.zarr", images[:1], maps[:1], np.array([0]))
    settings = EvaluationSettings(encoders=("tiny_a",), device="cpu", knn_k=5)
    with one_thread():
        result = evaluate_distribution(ImageSet.open(real, "test"), ImageSet.open(syn), settings, encoder_factory=tiny_factory)
    enc = result["encoders"]["tiny_a"]
    assert enc["fd"] is None and "2 images" in enc["reasons"]["fd"]
    assert enc["precision"] is None and "k=5" in enc["reasons"]["precision"]
    fidelity = {"kind": "fidelity", "variant": "map", "label": {"miou": 0.4, "pixel_accuracy": 0.6},
                "crop": {"encoder": "colour", "ratio": None, "ratio_outside": None, "reason": "no crops"}}
    table = assemble([result, fidelity])
    md = to_markdown(table)
    assert "n/a" in md and "nan" not in md.lower()
    assert any("fd (tiny_a): n/a" in n for n in table.notes) and any("crop fidelity: n/a, no crops" in n for n in table.notes)


def test_fidelity_command_writes_both_measures(tmp_path):
    real = write_cohort(tmp_path / "patches.zarr", n=64, size=32)
    build_crop_bank(real, tmp_path / "bank.zarr", CropBankConfig(per_type=10, size=16, splits=("train",)))
    images, maps, boxes, labels, valid, _ = make_cohort(8, 32, seed=3)
    _synthetic_store(tmp_path / "syn.zarr", images, maps, boxes, labels, valid, _canvases(images, boxes, valid),
                     np.array(["x"] * 8, dtype=object))
    settings = EvaluationSettings(device="cpu", segmentation=SegmentationSettings(steps=2, batch_size=4, num_workers=0))
    with one_thread():
        evaluate_segmentation("real", real, None, settings, model_out=tmp_path / "seg.pt")
    run_cli("evaluate-fidelity", "--synthetic", tmp_path / "syn.zarr", "--real", real, "--segmenter", tmp_path / "seg.pt",
            "--crop-bank", tmp_path / "bank.zarr", "--variant", "map_crops", "--out", tmp_path / "f.json")
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["kind"] == "fidelity" and out["variant"] == "map_crops"
    assert 0 <= out["label"]["miou"] <= 1 and out["label"]["n_images"] == 8
    assert out["crop"]["n_pairs"] > 0 and out["crop"]["ratio"] > 0 and out["crop"]["encoder"] == "efficientnet_lite0"
    proc = run_cli("evaluate-fidelity", "--synthetic", tmp_path / "syn.zarr", "--real", real, "--segmenter",
                   tmp_path / "nope.pt", "--crop-bank", tmp_path / "bank.zarr", "--out", tmp_path / "g.json", check=False)
    assert proc.returncode != 0 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr
