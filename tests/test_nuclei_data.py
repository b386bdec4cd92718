"""Nuclei data (Part A): labels, readers of the published layouts, the dataset sheet, the
nuclei store and its torch Dataset, and unlabeled patches from the real demo slide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from histopipe.config import load_config
from histopipe.errors import ConfigError, HistopipeError, SlideError
from histopipe.nuclei.labels import (
    CONIC_CLASSES,
    PANNUKE_CLASSES,
    centroids,
    distance_map,
    instance_classes,
    point_raster,
    points_from_raster,
    relabel,
    semantic_map,
)
from histopipe.nuclei.readers import (
    class_names,
    read_conic,
    read_folder,
    read_pannuke,
    read_samples,
    sample_groups,
)
from histopipe.nuclei.sheet import read_nuclei_sheet
from histopipe.nuclei.store import (
    NucleiDataset,
    NucleiDataSettings,
    NucleiStoreWriter,
    auto_test_groups,
    build_nuclei_store,
    store_info,
)
from tests.nuclei_helpers import same_partition, write_conic, write_folder, write_pannuke

torch.set_num_threads(1)


# --- labels -----------------------------------------------------------------------------------


def test_class_names():
    assert CONIC_CLASSES == ("background", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
    assert PANNUKE_CLASSES == ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
    assert class_names("conic") == CONIC_CLASSES and class_names("pannuke") == PANNUKE_CLASSES
    with pytest.raises(HistopipeError, match="unknown nuclei dataset format"):
        class_names("coco")


def test_semantic_map_majority_class_and_relabel():
    inst = np.zeros((6, 6), np.int32)
    inst[0:3, 0:3] = 5
    inst[3:6, 3:6] = 9
    sem = semantic_map(inst, {5: 2, 9: 4})
    assert sem.dtype == np.uint8 and set(np.unique(sem)) == {0, 2, 4} and (sem[inst == 5] == 2).all()
    noisy = sem.copy()
    noisy[0, 0] = 3  # one pixel of another class
    noisy[3, 3] = 0  # and one background pixel under a nucleus
    assert instance_classes(inst, noisy) == {5: 2, 9: 4}
    r = relabel(inst)
    assert r.dtype == np.int32 and set(np.unique(r)) == {0, 1, 2} and same_partition(r, inst)


def test_distance_map_is_normalised_per_nucleus():
    yy, xx = np.mgrid[0:64, 0:64]
    inst = np.zeros((64, 64), np.int32)
    inst[np.hypot(yy - 16, xx - 16) <= 12] = 1  # large
    inst[np.hypot(yy - 48, xx - 48) <= 4] = 2  # small
    inst[(np.hypot(yy - 16, xx - 34) <= 8) & (inst == 0)] = 3  # touches nucleus 1
    d = distance_map(inst)
    assert d.dtype == np.float32 and d.min() == 0 and d.max() == 1
    assert (d[inst == 0] == 0).all() and (d[inst > 0] > 0).all()
    for i in (1, 2, 3):
        assert d[inst == i].max() == pytest.approx(1.0)  # every nucleus peaks at 1 whatever its size
    # The shared border is a valley: the EDT is of each nucleus alone.
    border = (inst == 1) & np.roll(inst == 3, -1, axis=1)
    assert border.any() and d[border].max() < 0.3
    assert d[16, 16] == pytest.approx(1.0)


def test_centroids_lie_inside_nonconvex_nuclei_and_point_raster():
    yy, xx = np.mgrid[0:48, 0:48]
    r = np.hypot(yy - 24, xx - 24)
    inst = np.zeros((48, 48), np.int32)
    inst[(r <= 14) & (r >= 8) & (xx < 28)] = 1  # crescent: its mean lies in the hole
    inst[2:8, 40:46] = 2
    sem = semantic_map(inst, {1: 3, 2: 1})
    pts = centroids(inst, sem)
    assert pts.shape == (2, 3) and pts.dtype == np.int64
    ys, xs = np.nonzero(inst == 1)
    assert inst[int(round(ys.mean())), int(round(xs.mean()))] == 0  # the naive centroid misses
    for (y, x, c), i in zip(pts, (1, 2), strict=True):
        assert inst[y, x] == i and c == {1: 3, 2: 1}[i]
    raster = point_raster(pts, (48, 48))
    assert raster.dtype == np.uint8 and (raster > 0).sum() == 2
    assert sorted(map(tuple, points_from_raster(raster))) == sorted(map(tuple, pts))
    assert centroids(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.uint8)).shape == (0, 3)
    with pytest.raises(ValueError):
        point_raster(np.array([[1, 1, 0]]), (4, 4))


# --- readers ----------------------------------------------------------------------------------


def _check(samples, truths, size=256):
    assert len(samples) == len(truths)
    for s, t in zip(samples, truths, strict=True):
        assert s.image.dtype == np.uint8 and s.image.shape == (size, size, 3)
        assert s.instances.dtype == np.int32 and s.semantic.dtype == np.uint8
        assert np.array_equal(s.image, t.image)
        assert same_partition(s.instances, t.instances)
        assert s.instances.max() == len(t.classes)  # ids 1..N
        assert np.array_equal(s.semantic, t.semantic)


def test_read_conic(tmp_path):
    truths = write_conic(tmp_path / "conic", n=4, sources=2)
    samples = list(read_conic(tmp_path / "conic"))
    _check(samples, truths)
    assert [s.name for s in samples] == [t.name for t in truths]
    assert [s.group for s in samples] == ["img0", "img1", "img0", "img1"]
    assert {s.tissue for s in samples} == {"unknown"}
    assert sample_groups("conic", tmp_path / "conic") == ["img0", "img1", "img0", "img1"]


def test_read_pannuke_relabels_per_channel_ids(tmp_path):
    fold, truths = write_pannuke(tmp_path, n=3)
    masks = np.load(next(fold.rglob("masks.npy")))
    # The layout really repeats ids across class channels (as the release does).
    assert masks[0, ..., 0].max() >= 1 and masks[0, ..., 1].max() >= 1 and masks[0, ..., 0].max() == masks[0, ..., 1].max()
    samples = list(read_pannuke(fold))
    _check(samples, truths)
    assert [s.tissue for s in samples] == ["Breast", "Colon", "Kidney"]
    # Some copies store the tissue names as an object array (not memory-mappable).
    types = next(fold.rglob("types.npy"))
    np.save(types, np.array(["Breast", "Colon", "Kidney"], dtype=object), allow_pickle=True)
    assert [s.tissue for s in read_pannuke(fold)] == ["Breast", "Colon", "Kidney"]


@pytest.mark.parametrize("ext", ["png", "tif", "npy"])
def test_read_folder(tmp_path, ext):
    truths = write_folder(tmp_path / "f", n=3, size=128, ext=ext)
    samples = list(read_folder(tmp_path / "f"))
    _check(samples, truths, size=128)
    assert [s.tissue for s in samples] == ["colon", "breast", "colon"]


def test_readers_memory_map_npy(tmp_path, monkeypatch):
    write_conic(tmp_path / "c", n=2)
    fold, _ = write_pannuke(tmp_path / "p", n=2)
    modes = []
    real = np.load

    def spy(path, *args, **kwargs):
        modes.append((str(path).rsplit("/", 1)[-1], kwargs.get("mmap_mode")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    list(read_conic(tmp_path / "c"))
    list(read_pannuke(fold))
    assert {m for name, m in modes if name in ("images.npy", "labels.npy", "masks.npy")} == {"r"}


def test_reader_errors(tmp_path):
    write_conic(tmp_path / "c", n=2)
    labels = np.load(tmp_path / "c" / "labels.npy")
    # Class id out of range, named with the file and the sample.
    bad = labels.copy()
    bad[1, 0, 0, 1] = 9
    np.save(tmp_path / "c" / "labels.npy", bad)
    with pytest.raises(HistopipeError, match=r"labels\.npy\[1\]: class ids 0\.\.9 out of range"):
        list(read_conic(tmp_path / "c"))
    np.save(tmp_path / "c" / "labels.npy", labels[:, :100])
    with pytest.raises(HistopipeError, match=r"labels\.npy: shape .* does not match"):
        list(read_conic(tmp_path / "c"))
    (tmp_path / "c" / "labels.npy").unlink()
    with pytest.raises(HistopipeError, match=r"labels\.npy: file not found"):
        list(read_conic(tmp_path / "c"))
    with pytest.raises(HistopipeError, match="no masks.npy"):
        (tmp_path / "p" / "images").mkdir(parents=True)
        np.save(tmp_path / "p" / "images" / "images.npy", np.zeros((1, 8, 8, 3)))
        np.save(tmp_path / "p" / "images" / "types.npy", np.array(["Colon"]))
        list(read_pannuke(tmp_path / "p"))
    np.save(tmp_path / "p" / "masks.npy", np.zeros((1, 8, 8, 5)))
    with pytest.raises(HistopipeError, match=r"masks\.npy: shape .* 6 channels"):
        list(read_pannuke(tmp_path / "p"))
    write_folder(tmp_path / "f", n=2, size=64)
    (tmp_path / "f" / "instances" / "00001.png").unlink()
    with pytest.raises(HistopipeError, match=r"instances/00001\.\(png\|tif\|tiff\|npy\): file not found"):
        list(read_folder(tmp_path / "f"))
    np.save(tmp_path / "f" / "instances" / "00001.npy", np.zeros((32, 64), np.int32))
    with pytest.raises(HistopipeError, match=r"00001\.npy: shape \(32, 64\) does not match"):
        list(read_folder(tmp_path / "f"))
    with pytest.raises(HistopipeError, match="unknown nuclei dataset format"):
        read_samples("coco", tmp_path)
    (tmp_path / "c" / "images.npy").write_bytes(b"not a numpy file")
    with pytest.raises(HistopipeError, match=r"images\.npy: cannot read"):
        list(read_conic(tmp_path / "c"))


# --- sheet ------------------------------------------------------------------------------------


def _sheet(tmp_path, body: str):
    p = tmp_path / "nuclei.tsv"
    p.write_text("dataset_id\tformat\tpath\tsplit\ttissue\n" + body)
    return p


def test_read_nuclei_sheet(tmp_path):
    (tmp_path / "data" / "conic").mkdir(parents=True)
    (tmp_path / "fold1").mkdir()
    sources = read_nuclei_sheet(_sheet(tmp_path, "conic\tconic\tdata/conic\t\tcolon\npn1\tpannuke\tfold1\ttest\t\n"))
    assert [(s.dataset_id, s.format, s.split, s.tissue) for s in sources] == [
        ("conic", "conic", "auto", "colon"), ("pn1", "pannuke", "test", None)]
    assert sources[0].path == (tmp_path / "data" / "conic").resolve()


@pytest.mark.parametrize("body, message", [
    ("a\tcoco\tx\tauto\t\n", r"nuclei.tsv:2: format: 'coco' is not one of"),
    ("a\tconic\tx\tval\t\n", r"nuclei.tsv:2: split: 'val' is not one of"),
    ("a\tconic\tx\t\t\na\tconic\tx\t\t\n", r"nuclei.tsv:3: duplicate dataset_id 'a' \(first on line 2\)"),
    ("a\tconic\tmissing\t\t\n", r"nuclei.tsv:2: dataset 'a': folder not found"),
    ("a b\tconic\tx\t\t\n", r"nuclei.tsv:2: dataset_id: 'a b' does not match"),
    ("", "has no datasets"),
])
def test_nuclei_sheet_errors(tmp_path, body, message):
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match=message):
        read_nuclei_sheet(_sheet(tmp_path, body))


def test_nuclei_sheet_columns(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("dataset_id\tpath\nx\ty\n")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['format'\]"):
        read_nuclei_sheet(p)
    with pytest.raises(ConfigError, match="not found"):
        read_nuclei_sheet(tmp_path / "none.tsv")


# --- settings ---------------------------------------------------------------------------------


def test_settings_from_config():
    assert NucleiDataSettings.from_config(load_config()) == NucleiDataSettings()
    s = NucleiDataSettings.from_config(load_config(overrides={"nuclei": {"data": {"patch_size": 128, "test_fraction": 0.5}}}))
    assert (s.patch_size, s.test_fraction, s.seed) == (128, 0.5, 0)
    with pytest.raises(ConfigError, match="nuclei.data"):
        load_config(overrides={"nuclei": {"data": {"patch_sise": 128}}})
    with pytest.raises(ConfigError, match="test_fraction"):
        load_config(overrides={"nuclei": {"data": {"test_fraction": 1.5}}})


# --- store ------------------------------------------------------------------------------------


def test_auto_test_groups():
    groups = [f"g{i}" for i in range(10)]
    test = auto_test_groups(groups, 0.2, 0, "a")
    assert len(test) == 2 and test <= set(groups)
    assert auto_test_groups(reversed(groups * 3), 0.2, 0, "a") == test  # order and repeats do not matter
    assert len({frozenset(auto_test_groups(groups, 0.2, s, "a")) for s in range(6)}) > 1
    assert len(auto_test_groups(["a", "b"], 0.2, 0, "x")) == 1  # both splits get one
    assert auto_test_groups(["a", "b"], 0.0, 0, "x") == set() and auto_test_groups(["a"], 0.2, 0, "x") == set()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store of a CoNIC dataset (split auto, tissue override) and a folder dataset (train),
    256 px samples cut into 128 px patches."""
    tmp = tmp_path_factory.mktemp("nstore")
    conic = write_conic(tmp / "conic", n=4, sources=2, seed=1)
    folder = write_folder(tmp / "folder", n=2, seed=2)
    sheet = tmp / "nuclei.tsv"
    sheet.write_text("dataset_id\tformat\tpath\tsplit\ttissue\nconic\tconic\tconic\tauto\tcolon\nown\tfolder\tfolder\ttrain\t\n")
    settings = NucleiDataSettings(patch_size=128, test_fraction=0.2, seed=0)
    out = build_nuclei_store(read_nuclei_sheet(sheet), tmp / "nuclei.zarr", settings)
    return out, conic, folder, sheet, settings


def test_store_layout_and_content(built):
    out, conic, folder, _, _ = built
    root = zarr.open_group(str(out), mode="r")
    n = (4 + 2) * 4
    expect = {"image": ("uint8", (n, 128, 128, 3)), "instances": ("int32", (n, 128, 128)), "semantic": ("uint8", (n, 128, 128)),
              "distance": ("float16", (n, 128, 128)), "points": ("uint8", (n, 128, 128)), "tissue": ("int16", (n,)),
              "split": ("uint8", (n,))}
    for key, (dtype, shape) in expect.items():
        assert str(root[key].dtype) == dtype and root[key].shape == shape, key
    assert root.attrs["class_names"] == list(CONIC_CLASSES) and root.attrs["patch_size"] == 128
    assert root.attrs["tissue_names"] == ["colon", "breast"]
    names = root["name"][:].tolist()
    assert names[:4] == ["img0-0000_y0_x0", "img0-0000_y0_x128", "img0-0000_y128_x0", "img0-0000_y128_x128"]
    truths = conic + folder
    for i in range(n):
        t = truths[i // 4]
        y, x = (0 if i % 4 < 2 else 128), (0 if i % 2 == 0 else 128)
        sl = (slice(y, y + 128), slice(x, x + 128))
        inst = root["instances"][i]
        assert np.array_equal(root["image"][i], t.image[sl])
        assert same_partition(inst, t.instances[sl]) and inst.max() == len(np.unique(t.instances[sl])) - 1
        assert np.array_equal(root["semantic"][i], t.semantic[sl])
        np.testing.assert_allclose(root["distance"][i], distance_map(inst), atol=1e-3)
        pts = points_from_raster(root["points"][i])
        assert len(pts) == inst.max()  # one point per nucleus, inside it, with its class
        assert (inst[pts[:, 0], pts[:, 1]] > 0).all() and np.array_equal(pts[:, 2], root["semantic"][i][pts[:, 0], pts[:, 1]])
    tissue = root["tissue"][:]
    # The sheet's override for CoNIC, then tissue.tsv of the folder (colon, breast).
    assert tissue.tolist() == [0] * 16 + [0] * 4 + [1] * 4


def test_store_auto_split_keeps_source_images_together(built, tmp_path):
    out, _, _, sheet, settings = built
    root = zarr.open_group(str(out), mode="r")
    split = root["split"][:]
    # CoNIC: 2 source images, 20 % → one in test (both of its patches-of-patches); folder: all train.
    groups = np.array([n.split("-")[0] for n in root["name"][:16].tolist()])
    assert {tuple(np.unique(split[:16][groups == g])) for g in ("img0", "img1")} == {(0,), (1,)}
    assert (split[16:] == 0).all()
    info = store_info(out)
    assert info["splits"] == {"train": 16, "test": 8} and info["n_patches"] == 24
    assert info["tissues"] == {"colon": 20, "breast": 4} and info["labels"] is True
    assert sum(info["nuclei"]["train"].values()) + sum(info["nuclei"]["test"].values()) == int(root["points"][:].astype(bool).sum())
    # Rebuilding gives the same store.
    again = build_nuclei_store(read_nuclei_sheet(sheet), tmp_path / "again.zarr", settings)
    assert np.array_equal(zarr.open_group(str(again), mode="r")["split"][:], split)


def test_store_errors_leave_no_store(tmp_path):
    write_conic(tmp_path / "conic", n=2)
    fold, _ = write_pannuke(tmp_path, n=2)
    sheet = tmp_path / "s.tsv"
    sheet.write_text(f"dataset_id\tformat\tpath\nc\tconic\tconic\np\tpannuke\t{fold}\n")
    with pytest.raises(ConfigError, match="one store holds one class set"):
        build_nuclei_store(read_nuclei_sheet(sheet), tmp_path / "mixed.zarr", NucleiDataSettings())
    sheet.write_text("dataset_id\tformat\tpath\nc\tconic\tconic\n")
    with pytest.raises(HistopipeError, match=r"c: sample '.*' is 256x256 px, smaller than patch_size 512"):
        build_nuclei_store(read_nuclei_sheet(sheet), tmp_path / "big.zarr", NucleiDataSettings(patch_size=512))
    assert not (tmp_path / "big.zarr").exists() and not list(tmp_path.glob(".big.zarr*"))


def test_store_build_streams_samples(tmp_path, monkeypatch):
    import weakref

    from histopipe.nuclei import readers

    write_conic(tmp_path / "conic", n=6)
    alive_at_yield = []

    def tracking(path):
        refs = []
        for sample in read_conic(path):
            alive_at_yield.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(sample))
            yield sample

    monkeypatch.setitem(readers.READERS, "conic", tracking)
    sheet = tmp_path / "s.tsv"
    sheet.write_text("dataset_id\tformat\tpath\nc\tconic\tconic\n")
    build_nuclei_store(read_nuclei_sheet(sheet), tmp_path / "s.zarr", NucleiDataSettings())
    # When a sample is read, at most the previous one is still referenced: one at a time.
    assert len(alive_at_yield) == 6 and max(alive_at_yield) <= 1


def test_pannuke_store(tmp_path):
    fold, truths = write_pannuke(tmp_path, n=3)
    sheet = tmp_path / "s.tsv"
    sheet.write_text(f"dataset_id\tformat\tpath\tsplit\npn\tpannuke\t{fold}\ttest\n")
    out = build_nuclei_store(read_nuclei_sheet(sheet), tmp_path / "pn.zarr", NucleiDataSettings())
    info = store_info(out)
    assert info["class_names"] == list(PANNUKE_CLASSES) and info["splits"] == {"train": 0, "test": 3}
    assert info["tissues"] == {"Breast": 1, "Colon": 1, "Kidney": 1}
    counts = {c: sum(1 for t in truths for k in t.classes.values() if PANNUKE_CLASSES[k] == c) for c in PANNUKE_CLASSES[1:]}
    assert info["nuclei"]["test"] == counts


def test_nuclei_dataset(built):
    out = built[0]
    train, test, every = NucleiDataset(out, "train"), NucleiDataset(out, "test"), NucleiDataset(out, None)
    assert (len(train), len(test), len(every)) == (16, 8, 24)
    item = train[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["distance"].shape == (1, 128, 128) and item["distance"].min() == -1 and item["distance"].max() == pytest.approx(1)
    assert item["semantic"].dtype == torch.int64 and item["semantic"].shape == (128, 128)
    assert item["points"].dtype == torch.int64 and int((item["points"] > 0).sum()) == int(item["instances"].max())
    assert item["tissue"].dtype == torch.int64 and item["tissue"].ndim == 0
    batch = next(iter(torch.utils.data.DataLoader(pickle.loads(pickle.dumps(test)), batch_size=4)))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["tissue"].shape == (4,)
    with pytest.raises(ConfigError, match="unknown split"):
        NucleiDataset(out, "val")
    with pytest.raises(HistopipeError, match="not a nuclei store"):
        NucleiDataset(out.parent / "nothing.zarr")


def test_writer_refuses_wrong_input(tmp_path):
    with NucleiStoreWriter(tmp_path / "img.zarr", 32, ()) as w:
        pass
    assert store_info(tmp_path / "img.zarr")["n_patches"] == 0
    w = NucleiStoreWriter(tmp_path / "x.zarr", 32, (), labels=False)
    with pytest.raises(HistopipeError, match=r"shape \(16, 16, 3\) is not \(32, 32, 3\)"):
        w.add_image(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="unknown split"):
        w.add_image(np.zeros((32, 32, 3), np.uint8), split="val")
    w.abort()
    assert not (tmp_path / "x.zarr").exists() and not list(tmp_path.glob(".x.zarr*"))


# --- unlabeled patches from the WSI cohort ----------------------------------------------------


def test_wsi_store_on_demo_slide(cmu_slide, tmp_path):
    from histopipe.nuclei.wsi import build_wsi_store
    from histopipe.slides import open_slide
    from histopipe.tiling import TileStore, TilingConfig, tile_slide

    tile_slide(cmu_slide, tmp_path / "tiles.zarr", "cmu", TilingConfig(mpp=1.0, tile_size=256), backend="openslide")
    n_tissue = len(TileStore(tmp_path / "tiles.zarr"))
    assert n_tissue > 3
    settings = NucleiDataSettings(patch_size=128, wsi_mpp=0.5, wsi_tiles=3, seed=1)
    out = build_wsi_store(cmu_slide, tmp_path / "tiles.zarr", tmp_path / "wsi.zarr", settings, backend="openslide")
    info = store_info(out)
    assert info["labels"] is False and info["n_patches"] == 3 and info["splits"] == {"train": 3, "test": 0}
    root = zarr.open_group(str(out), mode="r")
    assert "semantic" not in root and root["image"].shape == (3, 128, 128, 3)
    # The patches are the slide's pixels at 0.5 µm/px (the slide is 0.499 µm/px: read natively).
    with open_slide(cmu_slide, "openslide") as reader:
        for (x, y), img in zip(root.attrs["coords"], root["image"][:], strict=True):
            assert np.array_equal(img, reader.read_region((x, y), 0, (128, 128)))
            assert img.std() > 10  # tissue, not blank glass
    ds = NucleiDataset(out, "train")
    assert set(ds[0]) == {"image", "tissue", "index"} and ds[0]["image"].shape == (3, 128, 128)
    with pytest.raises(SlideError, match="coarser than the target"):
        build_wsi_store(cmu_slide, tmp_path / "tiles.zarr", tmp_path / "fine.zarr",
                        NucleiDataSettings(patch_size=128, wsi_mpp=0.25, wsi_tiles=3), backend="openslide")
