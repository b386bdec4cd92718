"""Synthesis outputs (zarr, PNG pairs, manifest), crop placement, resumption, flagging, CLI."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from PIL import Image

from histopipe.cli import main
from histopipe.diffusion import synthesis as syn
from histopipe.diffusion.data import BankCrops, PatchRows, open_training_set, store_info
from histopipe.diffusion.flagging import flag_hallucinations, knn_distance
from histopipe.diffusion.models import build_vae
from histopipe.diffusion.pipeline import HistoSynthesisPipeline
from histopipe.diffusion.settings import SynthesisSettings
from histopipe.diffusion.tasks import LDMTask, reference_batch
from histopipe.errors import HistopipeError
from tests.diffusion_helpers import (  # noqa: F401 (one_thread: autouse fixture)
    LABEL_NAMES,
    one_thread,
    tiny_ldm,
    tiny_vae,
    write_crop_bank,
    write_patch_store,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-data")
    patches = write_patch_store(root / "patches.zarr")
    return patches, write_crop_bank(patches, root / "crop_bank.zarr")


@pytest.fixture(scope="module")
def pipe(data):
    """An untrained tiny map + crops pipeline (synthesis plumbing does not need a good model)."""
    store = open_training_set(data[0], "train")
    torch.manual_seed(0)
    task = LDMTask(tiny_ldm(), build_vae(tiny_vae(), 32), 32, store_info(data[0])["level_luts"], reference_batch(store, 2), LABEL_NAMES, 0.5)
    return task.pipeline(task.model.eval())


def test_crops_are_placed_inside_their_regions():
    label_map = np.zeros((32, 32), np.uint16)
    label_map[:, :20] = 1
    label_map[:5, 20:] = 2  # a strip 5 px high: crops shrink to fit
    label_map[20:, 20:] = 3  # no crop offered for type 3
    crop = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    placed = syn.place_crops(label_map, lambda t: None if t == 3 else (crop, f"c{t}"), 4, np.random.default_rng(0), min_side=4)
    assert [c.label for c in placed] == [1, 2]
    for c in placed:
        y0, x0, s = c.box
        assert (label_map[y0 : y0 + s, x0 : x0 + s] == c.label).all()
    assert placed[0].pixels.shape == (10, 10, 3) and placed[1].pixels.shape == (5, 5, 3)
    assert len(syn.place_crops(label_map, lambda t: (crop, ""), 1, np.random.default_rng(0))) == 1
    assert syn.place_crops(label_map, lambda t: (crop, ""), 4, np.random.default_rng(0), min_side=6)[-1].label == 3


def _read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as fh:
        return list(csv.DictReader(fh))


def _check_outputs(out: Path, maps: np.ndarray):
    g = zarr.open_group(str(out / "synthetic.zarr"), mode="r")
    n = len(maps)
    assert g["images"].shape == (n, 32, 32, 3) and g["images"].dtype == np.uint8
    assert np.array_equal(g["maps"][:], maps)  # exactly the conditioning maps
    present = g["present"][:]
    for i in range(n):
        assert set(np.flatnonzero(present[i])) == set(np.unique(maps[i]))
    rows = _read_manifest(out)
    assert [r["id"] for r in rows] == [str(v) for v in g["item_id"][:]]
    for i, r in enumerate(rows):
        img = np.array(Image.open(out / r["image"]))
        lab = np.array(Image.open(out / r["label"]))
        assert np.array_equal(img, g["images"][i]) and lab.dtype == np.uint16 and np.array_equal(lab, maps[i])
        boxes = json.loads(r["crop_boxes"])
        assert len(boxes) == len(json.loads(r["crop_sources"])) == int(g["crop_valid"][i].sum())
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{r['id']}.png" for r in rows]
    assert not (out / "parts").exists()
    return g, rows


def test_held_out_and_bank_synthesis_write_matching_pairs(pipe, data, tmp_path):
    store = PatchRows(data[0], "test")
    s = SynthesisSettings(sampler="ddim", steps=2, guidance_scale=2.0, batch_size=3, seed=5)
    items = syn.held_out_items(store, 3, s.seed)
    syn.synthesize(pipe, items, tmp_path / "a", s, {"mode": "held-out"}, store.level_luts)
    g, rows = _check_outputs(tmp_path / "a", np.stack([store.raw(i)["map"] for i in range(len(store))]))
    assert [int(r["seed"]) for r in rows] == [5, 6]
    raw = store.raw(0)
    assert np.array_equal(g["crop_boxes"][0][g["crop_valid"][0]], raw["crop_boxes"][raw["crop_valid"]])
    assert rows[0]["map_source"].startswith("patches.zarr#")
    assert open_training_set(tmp_path / "a" / "synthetic.zarr", "train")[0]["image"].shape == (3, 32, 32)  # contract #4 layout

    bank_items = syn.bank_items(store, BankCrops(data[1]), 3, s.seed, min_side=4)
    syn.synthesize(pipe, bank_items, tmp_path / "c", s, {"mode": "crop-bank"})
    _, rows = _check_outputs(tmp_path / "c", np.stack([it.map for it in bank_items]))
    assert all(src.startswith("crop_bank.zarr#") for r in rows for src in json.loads(r["crop_sources"]))
    for it in bank_items:
        for c in it.crops:
            y0, x0, side = c.box
            assert (it.map[y0 : y0 + side, x0 : x0 + side] == c.label).all()


def test_synthesis_resumes_from_finished_batches(pipe, data, tmp_path, monkeypatch):
    store = PatchRows(data[0], None)
    s = SynthesisSettings(sampler="ddim", steps=2, batch_size=2)
    items = syn.held_out_items(store, 3, 0, limit=5)
    syn.synthesize(pipe, items, tmp_path / "whole", s)
    whole = zarr.open_group(str(tmp_path / "whole" / "synthetic.zarr"), mode="r")["images"][:]

    calls = []
    original = HistoSynthesisPipeline.__call__

    def failing_second_batch(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise RuntimeError("preempted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HistoSynthesisPipeline, "__call__", failing_second_batch)
    with pytest.raises(RuntimeError, match="preempted"):
        syn.synthesize(pipe, items, tmp_path / "cut", s)
    assert not (tmp_path / "cut" / "manifest.csv").exists()
    calls.clear()
    monkeypatch.setattr(HistoSynthesisPipeline, "__call__", lambda self, *a, **k: (calls.append(len(a[0])), original(self, *a, **k))[1])
    syn.synthesize(pipe, items, tmp_path / "cut", s)
    assert calls == [2, 1]  # the first batch was not redone
    resumed = zarr.open_group(str(tmp_path / "cut" / "synthetic.zarr"), mode="r")["images"][:]
    assert np.array_equal(resumed, whole) and len(_read_manifest(tmp_path / "cut")) == 5

    # Parts made with other settings are discarded, not mixed in.
    monkeypatch.setattr(HistoSynthesisPipeline, "__call__", failing_second_batch)
    calls.clear()
    with pytest.raises(RuntimeError, match="preempted"):
        syn.synthesize(pipe, items, tmp_path / "cut2", s)
    monkeypatch.setattr(HistoSynthesisPipeline, "__call__", lambda self, *a, **k: (calls.append(len(a[0])), original(self, *a, **k))[1])
    calls.clear()
    syn.synthesize(pipe, items, tmp_path / "cut2", SynthesisSettings(sampler="ddim", steps=3, batch_size=2))
    assert calls == [2, 2, 1]


def test_user_maps_and_their_errors(pipe, tmp_path):
    label_map = np.zeros((32, 32), np.uint16)
    label_map[:, :16], label_map[:, 16:] = 1, 4
    Image.fromarray(label_map).save(tmp_path / "map.png")
    for name in ("1", "necrosis"):
        (tmp_path / "crops" / name).mkdir(parents=True)
        Image.fromarray(np.full((12, 9, 3), 200, np.uint8)).save(tmp_path / "crops" / name / "a.png")
    crops = syn.read_crop_folder(tmp_path / "crops", pipe.config.label_names)
    assert sorted(crops) == [1, 4] and crops[4][0][0].shape == (9, 9, 3)
    items = syn.user_map_items([tmp_path / "map.png"], crops, 2, 3, seed=1, min_side=4)
    assert [it.seed for it in items] == [1, 2] and all(len(it.crops) == 2 for it in items)
    syn.synthesize(pipe, items, tmp_path / "out", SynthesisSettings(sampler="ddim", steps=2, guidance_scale=1.0))
    _check_outputs(tmp_path / "out", np.stack([label_map, label_map]))

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(HistopipeError, match="16×16 px"):
        syn.synthesize(pipe, syn.user_map_items([tmp_path / "small.png"], None, 1, 3, 0), tmp_path / "x", SynthesisSettings())
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(HistopipeError, match="id 9 unknown"):
        syn.synthesize(pipe, syn.user_map_items([tmp_path / "bad.png"], None, 1, 3, 0), tmp_path / "x", SynthesisSettings())
    (tmp_path / "crops" / "nonsense").mkdir()
    with pytest.raises(HistopipeError, match="neither a tissue-type id"):
        syn.read_crop_folder(tmp_path / "crops", pipe.config.label_names)


def test_flagging_marks_images_far_from_real_tiles():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 16))
    real = (centres[rng.integers(0, 5, 200)] + rng.normal(0, 1, (200, 16))).astype(np.float32)
    near = (centres[rng.integers(0, 5, 20)] + rng.normal(0, 1, (20, 16))).astype(np.float32)
    far = rng.normal(0, 1, (20, 16)).astype(np.float32) + 40
    flags = flag_hallucinations(np.concatenate([near, far]), real, k=3, quantile=0.99, normalize=False)
    assert flags.flagged[20:].all() and flags.flagged[:20].mean() <= 0.1
    assert flags.threshold == pytest.approx(np.quantile(flags.real_scores, 0.99))
    # Leave-one-out skips each row's own match, also when rows are duplicated.
    pts = np.array([[0, 0], [0, 0], [3, 4]], np.float32)
    assert np.allclose(knn_distance(pts, pts, 1, exclude_self=True), [0, 0, 5])
    assert np.allclose(knn_distance(pts[2:], pts, 2), [2.5])  # itself (0) and (0, 0) (5)
    with pytest.raises(HistopipeError, match="widths differ"):
        flag_hallucinations(near, real[:, :8])


@pytest.mark.slow
def test_cli_train_and_synthesize_end_to_end(data, tmp_path, caplog):
    patches, bank = data
    preset = {k: v for k, v in yaml.safe_load((ROOT / "config" / "presets" / "tiny.yaml").read_text()).items() if k != "evaluation"}
    preset["vae"].update(max_steps=4, checkpoint_every=2, sample_every=2)
    preset["ldm"].update(max_steps=4, checkpoint_every=2, sample_every=4, sample_steps=2, max_crops=3, variant="map")
    preset["synthesis"].update(steps=2, batch_size=4, num_per_map=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(preset))

    # The installed entry point once, in a fresh interpreter; the other commands in-process.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "histopipe", "train-vae", "--dataset", str(patches), "--out",
                           str(tmp_path / "vae"), "--config", str(config)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "vae" / "model" / "config.json").is_file()

    def cli(*args):
        assert main([str(a) for a in args]) == 0

    ldm_args = ("train-ldm", "--dataset", patches, "--vae", tmp_path / "vae" / "model", "--out", tmp_path / "ldm", "--config", config,
                "--config-json", json.dumps({"ldm": {"variant": "map_crops"}}))
    cli(*ldm_args)
    model = tmp_path / "ldm" / "model"
    assert (model / "model_index.json").is_file() and (tmp_path / "ldm" / "samples" / "step-0000004.png").is_file()
    # --config-json overrides the file's map-only variant: the condition encoder reads crops,
    # and the condition reaches the UNet by input injection (no ControlNet branch).
    encoder = json.loads((model / "condition_encoder" / "config.json").read_text())
    assert encoder["with_crops"] and encoder["embed_dim"] == preset["ldm"]["map_embed_dim"]
    unet = json.loads((model / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 4 + encoder["out_channels"] and not (model / "controlnet").exists()
    assert sorted(p.name for p in (tmp_path / "ldm" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    caplog.set_level(logging.INFO)
    cli(*ldm_args)  # a finished training resumes at its last step and only re-exports
    assert "resumed from" in caplog.text and "step 4" in caplog.text

    cli("synthesize", "--model", model, "--out", tmp_path / "a", "--mode", "held-out", "--dataset", patches, "--config", config)
    store = PatchRows(patches, "test")
    _check_outputs(tmp_path / "a", np.stack([store.raw(i)["map"] for i in range(len(store))]))
    cli("synthesize", "--model", model, "--out", tmp_path / "c", "--mode", "crop-bank", "--dataset", patches,
        "--crop-bank", bank, "--config", config)
    assert len(_read_manifest(tmp_path / "c")) == len(store)
    Image.fromarray(store.raw(0)["map"]).save(tmp_path / "map.png")
    (tmp_path / "crops" / "2").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 180, np.uint8)).save(tmp_path / "crops" / "2" / "x.png")
    cli("synthesize", "--model", model, "--out", tmp_path / "b", "--mode", "user-map", "--map", tmp_path / "map.png",
        "--crops", tmp_path / "crops", "--config", config)
    _check_outputs(tmp_path / "b", np.stack([store.raw(0)["map"]] * 2))
    assert main(["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--mode", "held-out", "--dataset", str(patches)]) == 2
    assert main(["synthesize", "--model", str(model), "--out", str(tmp_path / "x"), "--mode", "user-map", "--map", str(tmp_path / "map.png")]) == 2


def test_cli_flag_hallucinations(pipe, data, tmp_path):
    pytest.importorskip("histopipe.encoders")  # the encoder registry comes from another branch
    store = PatchRows(data[0], "test")
    syn.synthesize(pipe, syn.held_out_items(store, 3, 0), tmp_path, SynthesisSettings(sampler="ddim", steps=1))
    assert main(["flag-hallucinations", "--synthetic", str(tmp_path / "synthetic.zarr"), "--real", str(data[0]),
                 "--out", str(tmp_path / "flags.csv")]) == 0
    summary = json.loads((tmp_path / "flags.json").read_text())
    assert summary["n_synthetic"] == len(store) and summary["n_real"] == len(PatchRows(data[0], "train"))
    with open(tmp_path / "flags.csv") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == ["000000", "000001"]


def test_pipeline_in_bfloat16_samples(data, tmp_path):
    """synthesize loads the pipeline in bfloat16 on a GPU (no autocast): every op of the map +
    crops conditioning must run in that dtype (torchvision's roi_align has no bf16 kernel)."""
    store = open_training_set(data[0], "train")
    torch.manual_seed(0)
    task = LDMTask(tiny_ldm(), build_vae(tiny_vae(), 32), 32, store_info(data[0])["level_luts"], reference_batch(store, 2), LABEL_NAMES, 0.5)
    pipe16 = task.pipeline(task.model.eval()).to("cpu", torch.bfloat16)
    rows = PatchRows(data[0], "test")
    s = SynthesisSettings(sampler="dpmpp", steps=2, guidance_scale=2.0, batch_size=2, seed=5)
    items = syn.held_out_items(rows, 3, s.seed)[:2]
    assert any(len(it.crops) for it in items)
    syn.synthesize(pipe16, items, tmp_path / "bf16", s, {"mode": "held-out"}, rows.level_luts)
    images = zarr.open_group(str(tmp_path / "bf16" / "synthetic.zarr"), mode="r")["images"][:]
    assert images.shape == (2, 32, 32, 3) and images.std() > 0
