"""The dataset store (contract #4), splits by slide, PatchDataset and the crop bank, on the
demo cohort (real tissue) with hand-made two-level k-means-style maps."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import tifffile
import torch
import zarr

import histopipe.dataset as dataset_module
from histopipe.cropbank import CropBank, build_crop_bank, resize_square
from histopipe.dataset import (
    SPLITS,
    PatchDataset,
    PatchStoreWriter,
    assign_splits,
    build_dataset,
    dataset_info,
    extract_slide,
    jobs_from_maps,
    merge_stores,
    read_strings,
    write_failed_slide,
)
from histopipe.errors import ConfigError, HistopipeError, SlideError
from histopipe.maps_io import write_map_store
from histopipe.patches import PatchConfig, patch_geometry
from histopipe.pyramid import write_pyramid
from histopipe.sheet import SlideEntry, read_sheet
from histopipe.slides import open_slide
from histopipe.tissue import TissueConfig, tissue_mask
from tests.helpers import run_cli

CELL_UM = 64.0  # map cell side in µm
CFG = dict(patch_size=256, mpp=0.5, output_size=128, stride=128, min_tissue=0.5, rule="auto", min_entropy=0.7,
           max_patches_per_slide=4, max_crops=4, crop_min=40, crop_max=120, seed=3,
           crop_bank={"per_type": 3, "size": 32})


def fine_to_coarse(t: np.ndarray) -> np.ndarray:
    """Level-1 labels of the hand-made maps: fine types 1..6 → coarse 1..3 (0 stays 0)."""
    return np.where(t > 0, (t - 1) // 2 + 1, 0)


def stripe_map(entry: SlideEntry, out, shift: int = 0, blank: bool = False) -> None:
    """Two-level map over a slide: tissue from the real tissue mask, 6 fine types in 2×2-cell
    blocks, 3 coarse types; no level_luts attribute (the dataset derives them)."""
    with open_slide(entry.path, entry.backend or "auto", entry.mpp) as reader:
        w, h = reader.dimensions
        cell = CELL_UM / reader.mpp
        tm, _ = tissue_mask(reader, TissueConfig())
    rows, cols = int(np.ceil(h / cell)), int(np.ceil(w / cell))
    tissue = cv2.resize(tm.mask.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
    r, c = np.mgrid[0:rows, 0:cols]
    fine = (1 + ((r // 2) * 2 + (c // 2) + shift) % 6) * (tissue & (not blank))
    write_map_store(out, np.stack([fine, fine_to_coarse(fine)]), cell,
                    {"slide_id": entry.slide_id, "source": "kmeans", "num_labels": 7, "levels": [6, 3]})


@pytest.fixture(scope="module")
def cohort_maps(demo_cohort, tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps")
    entries = read_sheet(demo_cohort)
    paths = []
    for i, e in enumerate(entries):
        stripe_map(e, folder / f"{e.slide_id}.zarr", shift=i)
        paths.append(folder / f"{e.slide_id}.zarr")
    return demo_cohort, entries, paths


@pytest.fixture(scope="module")
def built(cohort_maps, tmp_path_factory):
    sheet, entries, maps = cohort_maps
    out = tmp_path_factory.mktemp("dataset") / "patches.zarr"
    summary = build_dataset(jobs_from_maps(maps, entries), out, PatchConfig(**CFG))
    return out, summary, entries


def test_assign_splits_never_share_a_slide():
    for n in range(1, 40):
        ids = [f"s{i:02d}" for i in range(n)]
        a = assign_splits(ids, (0.7, 0.15, 0.15), seed=5)
        assert sorted(a) == ids and set(a.values()) <= set(SPLITS)  # each slide in exactly one split
        counts = {s: list(a.values()).count(s) for s in SPLITS}
        assert counts["train"] >= 1
        if n >= 3:
            assert counts["val"] >= 1 and counts["test"] >= 1
        assert a == assign_splits(list(reversed(ids)), (0.7, 0.15, 0.15), seed=5)  # order-free, seeded
    big = assign_splits([f"s{i}" for i in range(100)], (0.7, 0.15, 0.15), seed=0)
    assert [list(big.values()).count(s) for s in SPLITS] == [70, 15, 15]
    assert big != assign_splits([f"s{i}" for i in range(100)], (0.7, 0.15, 0.15), seed=1)
    assert set(assign_splits([f"s{i}" for i in range(5)], (1.0, 0.0, 0.0)).values()) == {"train"}


def test_dataset_store_follows_the_contract(built):
    out, summary, entries = built
    root = zarr.open_group(str(out), mode="r")
    n = summary["n_patches"]
    assert n == len(entries) * 4  # every demo slide has ≥ 4 heterogeneous windows
    a = dict(root.attrs)
    assert (a["patch_size"], a["mpp"], a["read_patch_size"], a["read_mpp"]) == (128, 1.0, 256, 0.5)
    assert a["num_labels"] == 7 and a["levels"] == [6, 3] and a["max_crops"] == 4 and a["source"] == "kmeans"
    assert a["crop_range"] == [20, 60] and len(a["label_names"]) == 7
    expect = {"images": ((n, 128, 128, 3), np.uint8), "maps": ((n, 128, 128), np.uint16),
              "level_luts": ((2, 7), np.int32), "crop_boxes": ((n, 4, 3), np.int32), "crop_labels": ((n, 4), np.uint16),
              "crop_valid": ((n, 4), np.bool_), "coords": ((n, 2), np.int64), "split": ((n,), np.uint8)}
    for name, (shape, dtype) in expect.items():
        assert root[name].shape == shape and root[name].dtype == dtype, name
    assert root["images"].chunks == (1, 128, 128, 3)
    # Splits by slide: each slide's patches all carry the split recorded in attrs; no slide in two.
    slide_ids = read_strings(root["slide_id"])
    split = root["split"][:]
    assert set(a["splits"]) == set(slide_ids) and set(a["splits"].values()) == set(SPLITS)
    for sid in set(slide_ids):
        codes = set(split[slide_ids == sid].tolist())
        assert codes == {SPLITS.index(a["splits"][sid])}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not set(slide_ids[split == i]) & set(slide_ids[split == j])
    # Pixels come from the slides at the recorded coordinates; crops lie inside their regions.
    maps, boxes, labels, valid = root["maps"][:], root["crop_boxes"][:], root["crop_labels"][:], root["crop_valid"][:]
    cfg = PatchConfig(**CFG)
    by_id = {e.slide_id: e for e in entries}
    for k in range(0, n, 4):
        e = by_id[slide_ids[k]]
        x, y = root["coords"][k]
        with open_slide(e.path) as reader:
            geo = patch_geometry(reader, cfg)
            raw = reader.read_region((int(x), int(y)), geo.read_level, (geo.read_size, geo.read_size))
        np.testing.assert_array_equal(root["images"][k], cv2.resize(raw, (128, 128), interpolation=cv2.INTER_AREA))
    assert valid.sum() >= n
    for k, c in zip(*np.nonzero(valid), strict=True):
        y0, x0, side = boxes[k, c]
        assert 20 <= side <= 60
        assert (maps[k, y0 : y0 + side, x0 : x0 + side] == labels[k, c]).all()
    assert labels[valid].min() > 0  # a valid crop always belongs to a tissue region
    assert not boxes[labels == 0].any()  # unused slots are zero


def test_level_luts_are_derived_from_the_maps(built):
    out, _, _ = built
    luts = zarr.open_group(str(out), mode="r")["level_luts"][:]
    np.testing.assert_array_equal(luts[0], np.arange(7))
    np.testing.assert_array_equal(luts[1], fine_to_coarse(np.arange(7)))


def test_patch_dataset_items_and_levels(built):
    out, summary, _ = built
    root = zarr.open_group(str(out), mode="r")
    split = root["split"][:]
    sizes = {s: len(PatchDataset(out, s)) for s in SPLITS}
    assert sizes == {s: int((split == i).sum()) for i, s in enumerate(SPLITS)}
    assert sum(sizes.values()) == len(PatchDataset(out, None)) == summary["n_patches"]
    ds0, ds1 = PatchDataset(out, "train", level=0), PatchDataset(out, "train", level=1)
    item = ds0[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 128, 128)
    assert -1.0 <= float(item["image"].min()) < float(item["image"].max()) <= 1.0
    n = item["index"]
    np.testing.assert_allclose(item["image"].numpy(), root["images"][n].transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    assert item["map"].dtype == torch.int64 and item["map"].shape == (128, 128)
    assert item["crop_boxes"].dtype == torch.int64 and item["crop_boxes"].shape == (4, 3)
    assert item["crop_labels"].dtype == torch.int64 and item["crop_valid"].dtype == torch.bool
    np.testing.assert_array_equal(item["map"].numpy(), root["maps"][n])
    coarse = ds1[1]
    np.testing.assert_array_equal(coarse["map"].numpy(), fine_to_coarse(root["maps"][n].astype(np.int64)))
    np.testing.assert_array_equal(coarse["crop_labels"].numpy(), fine_to_coarse(root["crop_labels"][n].astype(np.int64)))
    assert int(coarse["map"].max()) <= 3 and ds1.num_labels == 4
    # Picklable for DataLoader workers, and batches collate.
    clone = pickle.loads(pickle.dumps(ds0))
    assert torch.equal(clone[0]["map"], ds0[0]["map"])
    batch = next(iter(torch.utils.data.DataLoader(ds0, batch_size=3)))
    assert batch["image"].shape == (3, 3, 128, 128) and batch["crop_valid"].shape == (3, 4)
    with pytest.raises(Exception, match="level"):
        PatchDataset(out, "train", level=2)


def test_crop_bank_holds_real_crops_per_label(built, tmp_path):
    out, _, _ = built
    cfg = PatchConfig(**CFG)
    r = build_crop_bank(out, tmp_path / "bank.zarr", cfg.crop_bank, cfg.seed)
    root = zarr.open_group(str(out), mode="r")
    bank = zarr.open_group(str(tmp_path / "bank.zarr"), mode="r")
    m = r["n_crops"]
    assert bank["crops"].shape == (m, 32, 32, 3) and bank["crops"].dtype == np.uint8
    labels, idx, side = bank["labels"][:], bank["patch_index"][:], bank["side"][:]
    # Per label: at most per_type crops, and as many as the training split offers up to that.
    train = root["split"][:] == 0
    valid, crop_labels = root["crop_valid"][:], root["crop_labels"][:]
    for v in range(1, 7):
        offered = int((valid & (crop_labels == v) & train[:, None]).sum())
        assert (labels == v).sum() == min(offered, 3)
    assert (train[idx]).all()  # only training slides
    assert set(read_strings(bank["slide_id"])) <= {s for s, sp in root.attrs["splits"].items() if sp == "train"}
    # Each bank crop is its dataset crop resized.
    boxes = root["crop_boxes"][:]
    for j in range(m):
        n = idx[j]
        c = int(np.flatnonzero((crop_labels[n] == labels[j]) & valid[n])[0])
        y0, x0, s = boxes[n, c]
        assert s == side[j]
        np.testing.assert_array_equal(bank["crops"][j], resize_square(root["images"][n][y0 : y0 + s, x0 : x0 + s], 32))
    cb = CropBank(tmp_path / "bank.zarr")
    rng = np.random.default_rng(0)
    for v in cb.available:
        crop = cb.sample(v, rng)
        assert crop.shape == (32, 32, 3)
        assert any(np.array_equal(crop, bank["crops"][j]) for j in np.flatnonzero(labels == v))
    assert not cb.has(99)
    with pytest.raises(Exception, match="no crops of label 99"):
        cb.sample(99, rng)


def test_slide_without_heterogeneous_patches_gets_no_split(cmu_slide, tmp_path):
    entries = [SlideEntry("a", cmu_slide), SlideEntry("b", cmu_slide)]
    stripe_map(entries[0], tmp_path / "a.zarr")
    stripe_map(entries[1], tmp_path / "b.zarr", blank=True)
    r = build_dataset(jobs_from_maps([tmp_path / "a.zarr", tmp_path / "b.zarr"], entries), tmp_path / "p.zarr",
                      PatchConfig(**CFG))
    assert r["splits"] == {"a": "train"} and r["n_patches"] == 4
    info = dataset_info(tmp_path / "p.zarr")
    assert info["empty_slides"] == ["b"] and info["splits"]["train"]["patches"] == 4


def test_failed_build_leaves_no_store(cmu_image, tmp_path):
    """A slide whose tile data is corrupt (header fine) fails mid-way: nothing is left."""
    good = write_pyramid(tmp_path / "good.tiff", cmu_image[:1536, :1536], 0.5, levels=(1, 4))
    bad = write_pyramid(tmp_path / "bad.tiff", cmu_image[1024:2560, :1536], 0.5, levels=(1, 4))
    with tifffile.TiffFile(bad) as t:
        spans = list(zip(t.pages[0].dataoffsets, t.pages[0].databytecounts, strict=True))
    with open(bad, "r+b") as fh:
        for offset, count in spans[len(spans) // 3 :]:
            fh.seek(offset)
            fh.write(b"\0" * count)
    entries = [SlideEntry("good", good), SlideEntry("zbad", bad)]
    stripe_map(entries[0], tmp_path / "good.zarr")
    # The corrupt slide cannot be tissue-detected: give it a map that is all tissue.
    with open_slide(bad) as reader:
        w, h = reader.dimensions
    r, c = np.mgrid[0 : h // 128 + 1, 0 : w // 128 + 1]
    fine = 1 + ((r // 2) * 2 + c // 2) % 6
    write_map_store(tmp_path / "zbad.zarr", np.stack([fine, fine_to_coarse(fine)]), 128.0,
                    {"slide_id": "zbad", "source": "kmeans", "num_labels": 7, "levels": [6, 3]})
    jobs = jobs_from_maps([tmp_path / "good.zarr", tmp_path / "zbad.zarr"], entries)
    out = tmp_path / "out" / "patches.zarr"
    # The good slide is written first; the corrupt one fails while its patches are read.
    with pytest.raises(SlideError, match="bad.tiff"):
        build_dataset(jobs, out, PatchConfig(**{**CFG, "max_patches_per_slide": 50}))
    assert not out.exists() and list(out.parent.iterdir()) == []
    # The same call without the corrupt slide succeeds.
    build_dataset(jobs[:1], out, PatchConfig(**CFG))
    assert zarr.open_group(str(out), mode="r")["images"].shape[0] == 4


def test_per_slide_extract_and_merge_equal_build(built, cohort_maps, tmp_path):
    out, _, entries = built
    _, _, maps = cohort_maps
    jobs = jobs_from_maps(maps, entries)
    per_slide = [tmp_path / f"{m.name}" for m in maps]
    for job, target in zip(jobs, per_slide, strict=True):
        assert extract_slide(job, target, PatchConfig(**CFG))["n_patches"] == 4
        assert set(zarr.open_group(str(target), mode="r")["split"][:].tolist()) == {255}  # unassigned
    merged = tmp_path / "merged.zarr"
    merge_stores(per_slide[::-1], merged, PatchConfig(**CFG))  # input order does not matter
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(merged), mode="r")
    for key in ("splits", "patch_size", "mpp", "levels", "label_names", "crop_range", "config", "empty_slides", "per_slide"):
        assert a.attrs[key] == b.attrs[key], key
    for name in ("images", "maps", "crop_boxes", "crop_labels", "crop_valid", "coords", "split", "level_luts"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    np.testing.assert_array_equal(read_strings(a["slide_id"]), read_strings(b["slide_id"]))
    with pytest.raises(ConfigError, match="more than once"):
        merge_stores([per_slide[0], per_slide[0]], tmp_path / "dup.zarr", PatchConfig(**CFG))
    with pytest.raises(ConfigError, match="not in the cohort sheet"):
        jobs_from_maps(maps[:2], entries[:1])


def _store_files(path) -> dict:
    """Every file of a store by its path inside it, with its bytes."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_merge_in_small_blocks_equals_build_exactly(built, cohort_maps, tmp_path, monkeypatch):
    """The two-pass merge, with the writer flushing every 3 patches (20 patches: 6 full
    blocks and a partial one) and a failed slide among the inputs, writes the store
    build_dataset writes: same attributes, and every array's metadata and chunks byte for
    byte (only the root's zarr.json, holding the attributes, is compared as JSON)."""
    out, _, entries = built
    _, _, maps = cohort_maps
    per_slide = []
    for job in jobs_from_maps(maps, entries):
        per_slide.append(tmp_path / job.map_path.name)
        extract_slide(job, per_slide[-1], PatchConfig(**CFG))
    write_failed_slide(tmp_path / "ghost.zarr", "ghost", PatchConfig(**CFG), "unreadable")
    monkeypatch.setattr(dataset_module, "WRITE_BLOCK", 3)
    merged = tmp_path / "merged.zarr"
    r = merge_stores([per_slide[2], tmp_path / "ghost.zarr", *per_slide[:2], *per_slide[3:]], merged, PatchConfig(**CFG))
    assert r["n_patches"] == 20 and r["failed"] == ["ghost"]
    a, b = dict(zarr.open_group(str(out), mode="r").attrs), dict(zarr.open_group(str(merged), mode="r").attrs)
    assert b.pop("failed_slides") == {"ghost": "unreadable"} and a.pop("failed_slides") == {}
    assert a == b
    fa, fb = _store_files(out), _store_files(merged)
    assert fa.keys() == fb.keys()
    root_meta = [json.loads(f.pop("zarr.json")) for f in (fa, fb)]
    for meta in root_meta:
        meta["attributes"].pop("failed_slides")
    assert root_meta[0] == root_meta[1]
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_patch_store_writer_writes_in_blocks(tmp_path):
    """n > block: the writer holds one block of the small arrays, writes full blocks as they
    fill and the partial one at finish; the store equals one written in a single block."""
    rng = np.random.default_rng(0)
    n, size, c = 11, 8, 2
    rows = [(rng.integers(0, 255, (size, size, 3), np.uint8), rng.integers(0, 5, (size, size)).astype(np.uint16),
             rng.integers(0, 99, (c, 3)).astype(np.int32), rng.integers(0, 5, c).astype(np.uint16),
             rng.integers(0, 2, c).astype(bool), (int(rng.integers(1e6)), int(rng.integers(1e6))), f"s{i // 4}", i % 3)
            for i in range(n)]
    stores = {}
    for block in (4, None):
        path = tmp_path / f"block{block}.zarr"
        writer = PatchStoreWriter(zarr.open_group(str(path), mode="w", zarr_format=3), n, size, c, block=block)
        for i, row in enumerate(rows):
            writer.add(*row)
            if block:
                assert len(writer.buf["split"]) == 4 and writer.start == (i + 1) // 4 * 4  # flushed every 4th patch
        if block:
            # The full blocks are on disk before finish; the last 3 patches are not yet.
            assert zarr.open_group(str(path), mode="r")["coords"][7].tolist() == list(rows[7][5])
            assert zarr.open_group(str(path), mode="r")["coords"][8].tolist() == [0, 0]
            with pytest.raises(HistopipeError, match="more patches than planned"):
                PatchStoreWriter(zarr.open_group(str(tmp_path / "x.zarr"), mode="w"), 0, size, c).add(*rows[0])
        writer.finish(np.zeros((1, 5), np.int32), {"patch_size": size})
        stores[block] = path
    g = zarr.open_group(str(stores[4]), mode="r")
    np.testing.assert_array_equal(g["crop_boxes"][:], np.stack([r[2] for r in rows]))
    np.testing.assert_array_equal(g["crop_valid"][:], np.stack([r[4] for r in rows]))
    np.testing.assert_array_equal(g["coords"][:], np.array([r[5] for r in rows]))
    np.testing.assert_array_equal(g["split"][:], [r[7] for r in rows])
    assert read_strings(g["slide_id"]).tolist() == [r[6] for r in rows]
    assert _store_files(stores[4]) == _store_files(stores[None])
    short = PatchStoreWriter(zarr.open_group(str(tmp_path / "short.zarr"), mode="w"), 3, size, c, block=2)
    short.add(*rows[0])
    with pytest.raises(HistopipeError, match="wrote 1 patches, planned 3"):
        short.finish(np.zeros((1, 5), np.int32), {})


def test_lut_counts_reduced_one_store_at_a_time_equal_padded_sum():
    rng = np.random.default_rng(1)
    counts = [rng.integers(0, 50, (3, 7, k)) for k in (7, 9, 8)]
    reducer = dataset_module._LutReducer()
    for i, x in enumerate(counts):
        reducer.add(np.zeros((3, 7), np.int32), True, x, f"s{i}")
    assert reducer.shared  # identical LUTs from the maps: those are the cohort's
    np.testing.assert_array_equal(reducer.luts(), np.zeros((3, 7), np.int32))
    np.testing.assert_array_equal(reducer.counts, dataset_module._pad_counts(counts))
    reducer.add(np.ones((3, 7), np.int32), True, counts[0], "other")
    np.testing.assert_array_equal(reducer.luts(), dataset_module.luts_from_counts(dataset_module._pad_counts([*counts, counts[0]])))


@pytest.mark.slow
def test_cli_commands(built, cohort_maps, tmp_path):
    out, _, entries = built
    sheet, _, maps = cohort_maps
    cfg_json = json.dumps({"patches": CFG})
    listing = tmp_path / "maps.txt"
    listing.write_text("\n".join(map(str, maps[1:])) + "\n")
    one = tmp_path / "one.zarr"
    p = run_cli("build-dataset", "--maps", maps[0], "--list", listing, "--sheet", sheet, "--out", one, "--config-json", cfg_json)
    assert p.returncode == 0, p.stderr
    assert "20 patches from 5 slides (train 3, val 1, test 1)" in p.stdout
    np.testing.assert_array_equal(zarr.open_group(str(one), mode="r")["images"][:], zarr.open_group(str(out), mode="r")["images"][:])
    by_id = {e.slide_id: e for e in entries}
    sid = maps[0].name.removesuffix(".zarr")
    p = run_cli("extract-patches", maps[0], by_id[sid].path, "--out", tmp_path / "s0.zarr", "--config-json", cfg_json)
    assert p.returncode == 0 and "4 patches" in p.stdout, p.stderr
    p = run_cli("extract-patches", maps[0], tmp_path / "missing.svs", "--out", tmp_path / "f.zarr", "--slide-id", "ghost",
                "--on-error", "skip", "--config-json", cfg_json)
    assert p.returncode == 0 and "ghost: FAILED" in p.stdout, p.stderr
    p = run_cli("merge-patches", tmp_path / "s0.zarr", tmp_path / "f.zarr", "--out", tmp_path / "m.zarr", "--config-json", cfg_json)
    assert p.returncode == 0 and "4 patches from 2 slides (train 1, val 0, test 0)" in p.stdout, p.stderr
    merged_attrs = zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs
    assert list(merged_attrs["failed_slides"]) == ["ghost"] and "missing.svs" in merged_attrs["failed_slides"]["ghost"]
    p = run_cli("dataset-info", one, "--json", "--out", tmp_path / "info.json")
    info = json.loads(p.stdout)
    assert p.returncode == 0 and info["n_patches"] == 20 and info["splits"]["val"]["patches"] == 4
    assert json.loads((tmp_path / "info.json").read_text()) == info
    p = run_cli("crop-bank", one, "--out", tmp_path / "bank.zarr", "--config-json", cfg_json)
    assert p.returncode == 0 and "crops of 6 tissue types" in p.stdout, p.stderr
    # Bad input: one line naming the file, exit 2.
    p = run_cli("build-dataset", "--maps", tmp_path / "nope.zarr", "--sheet", sheet, "--out", tmp_path / "x.zarr")
    assert p.returncode == 2 and "nope.zarr" in p.stderr and "Traceback" not in p.stderr
