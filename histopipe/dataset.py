"""The training-patch dataset store (contract #4): writing, splitting by slide, reading
(:class:`PatchDataset`, defined in ``histopipe.patch_dataset`` and importable from here).

Layout (zarr v3): ``images`` uint8 (N, S, S, 3) chunk (1, S, S, 3); ``maps`` uint16
(N, S, S) finest labels; ``level_luts`` int32 (L, num_labels); ``crop_boxes`` int32 (N, C, 3)
= (y0, x0, side); ``crop_labels`` uint16 (N, C); ``crop_valid`` bool (N, C); ``slide_id``
str (N,); ``coords`` int64 (N, 2) level-0; ``split`` uint8 (N,) 0 train / 1 val / 2 test.

Stores are written patch by patch (only one patch's pixels in memory, and one block of
the small per-patch arrays) into a temporary folder that is renamed onto the target at the
end, so a failed run leaves no store. The per-slide stores of ``extract_slide`` have the
same layout with ``split`` = 255 (unassigned) and a ``lut_counts`` array; ``merge_stores``
assigns the splits, reading one per-slide store at a time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histopipe import __version__
from histopipe.atomic import atomic_path
from histopipe.errors import ConfigError, HistopipeError
from histopipe.maps_io import MapStore, jsonable, read_map_store
from histopipe.patches import (
    Patch,
    PatchConfig,
    PatchPlan,
    iter_patches,
    patch_geometry,
    plan_patches,
)
from histopipe.sheet import SlideEntry
from histopipe.slides import open_slide

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UNASSIGNED = 255
# Attributes every store of one dataset must agree on (merging checks them).
_SHARED_ATTRS = ("patch_size", "mpp", "num_labels", "label_names", "levels", "max_crops", "crop_range", "source",
                 "cluster_model_id")


# --- splits -------------------------------------------------------------------------------


def assign_splits(slide_ids: Iterable[str], fractions: tuple[float, float, float], seed: int = 0) -> dict[str, str]:
    """Assign whole slides to train/val/test (no slide is in two splits).

    Slides are shuffled with ``seed`` (from their sorted ids, so the input order does not
    matter). Val and test get ``round(fraction * n)`` slides, at least one each when their
    fraction is > 0 and there are ≥ 3 slides; train gets the rest, and keeps at least one
    slide when its fraction is > 0 (val, then test, give one up).
    """
    ids = sorted(set(slide_ids))
    n = len(ids)
    f_train, f_val, f_test = fractions
    n_val, n_test = int(round(f_val * n)), int(round(f_test * n))
    if n >= 3:
        n_val = max(n_val, int(f_val > 0))
        n_test = max(n_test, int(f_test > 0))
    room = n - int(f_train > 0)
    while n_val + n_test > max(room, 0):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(seed).permutation(n)
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return {ids[i]: names[rank] for rank, i in enumerate(order)}


# --- level look-up tables ---------------------------------------------------------------------


def lut_counts(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Co-occurrence of finest labels with each level's labels over a map ``(L, H, W)``:
    int64 ``(L, num_labels, K)`` (cells with finest label i and level-l label j)."""
    k = max(int(labels.max()) + 1 if labels.size else 1, num_labels)
    out = np.zeros((labels.shape[0], num_labels, k), dtype=np.int64)
    fine = labels[0].ravel().astype(np.int64)
    for lvl in range(labels.shape[0]):
        pair = fine * k + labels[lvl].ravel().astype(np.int64)
        out[lvl] = np.bincount(pair, minlength=num_labels * k).reshape(num_labels, k)
    return out


def luts_from_counts(counts: np.ndarray) -> np.ndarray:
    """Each finest label → its most frequent label at each level; row 0 identity, 0 → 0."""
    luts = counts.argmax(axis=2).astype(np.int32)
    luts[0] = np.arange(counts.shape[1])
    luts[:, 0] = 0
    return luts


def _pad_counts(counts: list[np.ndarray]) -> np.ndarray:
    k = max(c.shape[2] for c in counts)
    return sum(np.pad(c, ((0, 0), (0, 0), (0, k - c.shape[2]))) for c in counts)


# --- writing -------------------------------------------------------------------------------


# Patches per block of the small per-patch arrays: the writer holds one block of them.
WRITE_BLOCK = 4096


class PatchStoreWriter:
    """Writes ``n`` patches into an open zarr group, pixels one patch at a time; the small
    per-patch arrays (crops, coords, slide id, split: a few bytes per patch) are created
    up front and written a block of ``block`` patches at a time (default
    :data:`WRITE_BLOCK`), so the writer holds one block of them whatever ``n`` is.
    :meth:`finish` writes the last, partial block, the level LUTs and the attributes."""

    def __init__(self, root: zarr.Group, n: int, size: int, max_crops: int, block: int | None = None):
        self.root, self.n, self.size, self.max_crops = root, n, size, max_crops
        self.block = max(1, int(block or WRITE_BLOCK))
        c = max_crops
        rows = max(1, min(n, 65536))  # chunk rows of the small arrays (as when they were written whole)
        self.images = root.create_array("images", shape=(n, size, size, 3), dtype="uint8", chunks=(1, size, size, 3))
        self.maps = root.create_array("maps", shape=(n, size, size), dtype="uint16", chunks=(1, size, size))
        self.arrays = {
            "crop_boxes": root.create_array("crop_boxes", shape=(n, c, 3), dtype="int32", chunks=(rows, c, 3)),
            "crop_labels": root.create_array("crop_labels", shape=(n, c), dtype="uint16", chunks=(rows, c)),
            "crop_valid": root.create_array("crop_valid", shape=(n, c), dtype="bool", chunks=(rows, c)),
            "coords": root.create_array("coords", shape=(n, 2), dtype="int64", chunks=(rows, 2)),
            "split": root.create_array("split", shape=(n,), dtype="uint8", chunks=(rows,)),
            "slide_id": root.create_array("slide_id", shape=(n,), dtype=str, chunks=(rows,)),
        }
        b = min(self.block, max(n, 1))
        self.buf = {
            "crop_boxes": np.zeros((b, c, 3), dtype=np.int32),
            "crop_labels": np.zeros((b, c), dtype=np.uint16),
            "crop_valid": np.zeros((b, c), dtype=bool),
            "coords": np.zeros((b, 2), dtype=np.int64),
            "split": np.full(b, UNASSIGNED, dtype=np.uint8),
            "slide_id": np.empty(b, dtype=object),
        }
        self.i = 0  # patches added
        self.start = 0  # first patch of the block in the buffers

    def add(self, image: np.ndarray, labels: np.ndarray, crop_boxes: np.ndarray, crop_labels: np.ndarray,
            crop_valid: np.ndarray, coords: Sequence[int], slide_id: str, split: int) -> None:
        i = self.i
        if i >= self.n:
            raise HistopipeError(f"{self.root.store}: more patches than planned ({self.n})")
        self.images[i] = image
        self.maps[i] = labels
        j, buf = i - self.start, self.buf
        buf["crop_boxes"][j], buf["crop_labels"][j], buf["crop_valid"][j] = crop_boxes, crop_labels, crop_valid
        buf["coords"][j] = coords
        buf["slide_id"][j] = slide_id
        buf["split"][j] = split
        self.i += 1
        if self.i - self.start == len(buf["split"]):
            self._flush()

    def add_patch(self, p: Patch, slide_id: str, split: int) -> None:
        self.add(p.image, p.labels, p.crop_boxes, p.crop_labels, p.crop_valid, p.coords, slide_id, split)

    def _flush(self) -> None:
        """Write the patches added since the last flush (one block, or the last partial one)."""
        m = self.i - self.start
        if m:
            sl = slice(self.start, self.i)
            for name, array in self.arrays.items():
                block = self.buf[name][:m]
                array[sl] = block.astype(str) if name == "slide_id" else block
            self.start = self.i

    def finish(self, level_luts: np.ndarray, attrs: dict[str, Any]) -> None:
        if self.i != self.n:
            raise HistopipeError(f"{self.root.store}: wrote {self.i} patches, planned {self.n}")
        self._flush()
        self.buf = {}
        self.root.create_array("level_luts", data=np.asarray(level_luts, dtype=np.int32))
        self.root.attrs.update(jsonable(attrs))


def _dataset_attrs(cfg: PatchConfig, tmap: MapStore) -> dict[str, Any]:
    return {
        "patch_size": cfg.size,
        "mpp": cfg.stored_mpp,
        "read_patch_size": cfg.patch_size,
        "read_mpp": cfg.mpp,
        "num_labels": tmap.num_labels,
        "label_names": tmap.label_names,
        "levels": tmap.levels,
        "max_crops": cfg.max_crops,
        "crop_range": list(cfg.crop_range),
        "source": tmap.source,
        "cluster_model_id": tmap.attrs.get("cluster_model_id"),
        "cluster_model": tmap.attrs.get("cluster_model"),
        "config": cfg.to_dict(),
        "histopipe_version": __version__,
    }


@dataclass
class SlideJob:
    """A slide with its map: what one per-slide extraction needs."""

    map_path: Path
    slide_path: Path
    backend: str = "auto"
    mpp: float | None = None


def _plan(job: SlideJob, cfg: PatchConfig) -> tuple[MapStore, PatchPlan]:
    tmap = read_map_store(job.map_path)
    with open_slide(job.slide_path, job.backend, job.mpp) as reader:
        plan = plan_patches(tmap, reader.dimensions, patch_geometry(reader, cfg), cfg)
    c = plan.counts
    log.info("%s: %d candidate windows, %d with tissue, %d heterogeneous (%s), %d kept",
             tmap.slide_id, c["candidates"], c["tissue"], c["heterogeneous"], plan.rule, c["kept"])
    return tmap, plan


def _write_slide(writer: PatchStoreWriter, job: SlideJob, tmap: MapStore, plan: PatchPlan, cfg: PatchConfig, split: int) -> None:
    if len(plan) == 0:
        return
    with open_slide(job.slide_path, job.backend, job.mpp) as reader:
        for patch in iter_patches(reader, tmap, plan, cfg):
            writer.add_patch(patch, tmap.slide_id, split)


def _check_compatible(attrs: Sequence[dict], names: Sequence[str | Path]) -> None:
    first = attrs[0]
    for a, name in zip(attrs[1:], names[1:], strict=True):
        for key in _SHARED_ATTRS:
            if a.get(key) != first.get(key):
                raise HistopipeError(f"{name}: {key} {a.get(key)!r} differs from {names[0]} ({first.get(key)!r}); "
                                     "one dataset needs maps of one clustering and one patch setting")


def _cohort_luts(maps: Sequence[MapStore]) -> np.ndarray:
    luts = [m.level_luts for m in maps]
    if all(lut is not None for lut in luts) and all(np.array_equal(lut, luts[0]) for lut in luts):
        return luts[0]
    return luts_from_counts(_pad_counts([lut_counts(m.map, m.num_labels) for m in maps]))


def build_dataset(jobs: Sequence[SlideJob], out: str | Path, cfg: PatchConfig) -> dict[str, Any]:
    """Plan every slide, split the slides that have patches, write the dataset store
    (slides in id order, each slide's patches in plan order).

    Returns a summary ``{"n_patches", "splits", "per_slide"}``.
    """
    if not jobs:
        raise ConfigError("build-dataset: no map stores given")
    planned = [_plan(job, cfg) for job in jobs]
    # Slides in id order: the store does not depend on the order the maps were given in.
    order = sorted(range(len(jobs)), key=lambda i: planned[i][0].slide_id)
    jobs, planned = [jobs[i] for i in order], [planned[i] for i in order]
    maps = [m for m, _ in planned]
    ids = [m.slide_id for m in maps]
    dupes = sorted({s for s in ids if ids.count(s) > 1})
    if dupes:
        raise ConfigError(f"build-dataset: slide(s) {dupes} given more than once")
    _check_compatible([_dataset_attrs(cfg, m) for m in maps], [j.map_path for j in jobs])
    splits = assign_splits([m.slide_id for m, p in planned if len(p)], cfg.split.fractions(), cfg.seed)
    n = sum(len(p) for _, p in planned)
    attrs = _dataset_attrs(cfg, maps[0])
    attrs.update(splits=splits, split_seed=cfg.seed, empty_slides=sorted(m.slide_id for m, p in planned if not len(p)),
                 failed_slides={}, n_patches=n,
                 per_slide={m.slide_id: p.counts for m, p in planned})
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        writer = PatchStoreWriter(root, n, cfg.size, cfg.max_crops)
        for job, (tmap, plan) in zip(jobs, planned, strict=True):
            split = SPLITS.index(splits[tmap.slide_id]) if len(plan) else UNASSIGNED
            _write_slide(writer, job, tmap, plan, cfg, split)
        writer.finish(_cohort_luts(maps), attrs)
    return {"n_patches": n, "splits": splits, "per_slide": attrs["per_slide"]}


def extract_slide(job: SlideJob, out: str | Path, cfg: PatchConfig) -> dict[str, Any]:
    """Patches of one slide into a per-slide store (``split`` unassigned), for :func:`merge_stores`."""
    tmap, plan = _plan(job, cfg)
    attrs = _dataset_attrs(cfg, tmap)
    attrs.update(slide_id=tmap.slide_id, slide_path=str(Path(job.slide_path).resolve()), map_path=str(job.map_path),
                 splits={}, n_patches=len(plan), counts=plan.counts, rule=plan.rule,
                 map_luts=tmap.level_luts is not None)
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        writer = PatchStoreWriter(root, len(plan), cfg.size, cfg.max_crops)
        _write_slide(writer, job, tmap, plan, cfg, UNASSIGNED)
        counts = lut_counts(tmap.map, tmap.num_labels)
        luts = tmap.level_luts if tmap.level_luts is not None else luts_from_counts(counts)
        writer.finish(luts, attrs)
        root.create_array("lut_counts", data=counts)
    return {"n_patches": len(plan), "counts": plan.counts}


def write_failed_slide(out: str | Path, slide_id: str, cfg: PatchConfig, reason: str) -> None:
    """An empty per-slide store marking a slide that could not be used (``--on-error skip``);
    :func:`merge_stores` lists it under ``failed_slides``."""
    attrs = {"slide_id": slide_id, "status": "failed", "reason": reason, "splits": {}, "n_patches": 0,
             "patch_size": cfg.size, "max_crops": cfg.max_crops, "config": cfg.to_dict(), "histopipe_version": __version__}
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        PatchStoreWriter(root, 0, cfg.size, cfg.max_crops).finish(np.zeros((1, 1), np.int32), attrs)
        root.create_array("lut_counts", data=np.zeros((1, 1, 1), np.int64))


def _patch_settings(attrs: dict) -> dict:
    """The settings that decide which patches a per-slide store holds (not split or bank)."""
    return {k: v for k, v in attrs.get("config", {}).items() if k not in ("split", "crop_bank")}


@dataclass(slots=True)
class _SlideStore:
    """What the merge keeps of one per-slide store between its two passes (not the store)."""

    slide_id: str
    path: str | Path
    failed: bool
    reason: str = ""
    n: int = 0
    counts: dict | None = None
    shared: int = 0  # index of its shared attributes among the distinct ones seen
    settings: int = 0  # index of its patch settings among the distinct ones seen


def _index_of(value: Any, seen: list) -> int:
    """Index of ``value`` in ``seen`` (compared with ==), appended when new: stores of one
    dataset share one value, so ``seen`` stays short whatever the number of stores."""
    for i, v in enumerate(seen):
        if v == value:
            return i
    seen.append(value)
    return len(seen) - 1


class _LutReducer:
    """The cohort's level LUTs from the per-slide stores, reduced one store at a time:
    whether every store has the same LUTs from its map, and the summed co-occurrence counts
    (padded to the widest) for when they do not."""

    def __init__(self) -> None:
        self.first: np.ndarray | None = None
        self.shared = True
        self.counts: np.ndarray | None = None
        self.mismatch = ""  # a store whose counts do not add up with the others' (an error if they are needed)

    def add(self, level_luts: np.ndarray, map_luts: bool, counts: np.ndarray, name: str | Path) -> None:
        if self.first is None:
            self.first = level_luts
        self.shared = self.shared and bool(map_luts) and np.array_equal(level_luts, self.first)
        if self.counts is None:
            self.counts = counts.astype(np.int64, copy=True)
            return
        if counts.shape[:2] != self.counts.shape[:2]:
            self.mismatch = self.mismatch or (f"{name}: lut_counts of shape {counts.shape} do not match the other "
                                              f"stores' {self.counts.shape[:2]} (levels, labels)")
            return
        k = max(counts.shape[2], self.counts.shape[2])
        if self.counts.shape[2] < k:
            self.counts = np.pad(self.counts, ((0, 0), (0, 0), (0, k - self.counts.shape[2])))
        self.counts[:, :, : counts.shape[2]] += counts

    def luts(self) -> np.ndarray:
        if self.shared and self.first is not None:
            return self.first
        if self.mismatch:
            raise HistopipeError(self.mismatch)
        return luts_from_counts(self.counts)


def _open_slide_store(path: str | Path) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as err:
        raise HistopipeError(f"{path}: not a per-slide patch store (histopipe extract-patches): {err}") from None


def merge_stores(inputs: Sequence[str | Path], out: str | Path, cfg: PatchConfig) -> dict[str, Any]:
    """Merge per-slide stores into one dataset store, splitting by slide with ``cfg.split``
    and ``cfg.seed``: the same store :func:`build_dataset` writes from the same slides.

    Two passes, each opening one per-slide store at a time, so memory does not grow with
    the number of stores beyond a few small values per slide (its id, size, counts): the
    first reads each store's attributes, size and level LUTs (checked against the first
    store's and reduced as it goes), the second copies the patches in slide-id order.
    """
    if not inputs:
        raise ConfigError("merge-patches: no per-slide stores given")
    slides: list[_SlideStore] = []
    shared_seen: list[dict] = []
    settings_seen: list[dict] = []
    first: tuple[str, dict] | None = None  # the good store with the smallest slide id: its attributes
    reducer = _LutReducer()
    for p in inputs:
        try:
            r = zarr.open_group(str(p), mode="r")
            a = dict(r.attrs)
            images, lut_counts_array, sid = r["images"], r["lut_counts"], str(a["slide_id"])
        except Exception as err:
            raise HistopipeError(f"{p}: not a per-slide patch store (histopipe extract-patches): {err}") from None
        if a.get("status") == "failed":
            slides.append(_SlideStore(sid, p, True, reason=a.get("reason", "")))
            continue
        slides.append(_SlideStore(sid, p, False, n=int(images.shape[0]), counts=a.get("counts", {}),
                                  shared=_index_of({k: a.get(k) for k in _SHARED_ATTRS}, shared_seen),
                                  settings=_index_of(_patch_settings(a), settings_seen)))
        reducer.add(np.asarray(r["level_luts"][:]), a.get("map_luts"), np.asarray(lut_counts_array[:]), p)
        if first is None or sid < first[0]:
            first = (sid, a)
        del r, a, images, lut_counts_array
    ids = [s.slide_id for s in slides]
    dupes = sorted(s for s, k in Counter(ids).items() if k > 1)
    if dupes:
        raise ConfigError(f"merge-patches: slide(s) {dupes} given more than once")
    slides.sort(key=lambda s: s.slide_id)
    failed = [s for s in slides if s.failed]
    good = [s for s in slides if not s.failed]
    if not good or first is None:
        raise HistopipeError(f"merge-patches: every slide failed ({', '.join(ids)})")
    ref = good[0]
    for s in good[1:]:
        if s.shared != ref.shared:
            a, b = shared_seen[s.shared], shared_seen[ref.shared]
            key = next(k for k in _SHARED_ATTRS if a.get(k) != b.get(k))
            raise HistopipeError(f"{s.path}: {key} {a.get(key)!r} differs from {ref.path} ({b.get(key)!r}); "
                                 "one dataset needs maps of one clustering and one patch setting")
    for s in good[1:]:
        if s.settings != ref.settings:
            raise HistopipeError(f"{s.path}: extracted with other patch settings than {ref.path}")
    n_total = sum(s.n for s in good)
    splits = assign_splits([s.slide_id for s in good if s.n], cfg.split.fractions(), cfg.seed)
    level_luts = reducer.luts()
    first_attrs = first[1]
    size, c = int(first_attrs["patch_size"]), int(first_attrs["max_crops"])
    keep = (*_SHARED_ATTRS, "cluster_model", "read_patch_size", "read_mpp", "config", "histopipe_version")
    out_attrs = {k: v for k, v in first_attrs.items() if k in keep}
    out_attrs["config"] = {**first_attrs["config"], "split": cfg.to_dict()["split"]}
    out_attrs["split_seed"] = cfg.seed
    out_attrs.update(splits=splits, empty_slides=[s.slide_id for s in good if not s.n],
                     failed_slides={s.slide_id: s.reason for s in failed},
                     n_patches=n_total, per_slide={s.slide_id: s.counts for s in good})
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        writer = PatchStoreWriter(root, n_total, size, c)
        for s in good:
            if not s.n:
                continue
            split = SPLITS.index(splits[s.slide_id])
            r = _open_slide_store(s.path)
            images, maps = r["images"], r["maps"]
            if int(images.shape[0]) != s.n:
                raise HistopipeError(f"{s.path}: holds {images.shape[0]} patches, {s.n} when the merge began")
            boxes, labels, valid, coords = (np.asarray(r[k][:]) for k in ("crop_boxes", "crop_labels", "crop_valid", "coords"))
            for i in range(s.n):
                writer.add(images[i], maps[i], boxes[i], labels[i], valid[i], coords[i], s.slide_id, split)
            del r, images, maps, boxes, labels, valid, coords
        writer.finish(level_luts, out_attrs)
    return {"n_patches": n_total, "splits": splits, "failed": [s.slide_id for s in failed]}


def jobs_from_maps(map_paths: Sequence[str | Path], entries: Sequence[SlideEntry], backend: str = "auto") -> list[SlideJob]:
    """Pair each map store with its slide in the cohort sheet (by the map's ``slide_id``)."""
    by_id = {e.slide_id: e for e in entries}
    jobs = []
    for p in map_paths:
        sid = read_map_store(p).slide_id
        if sid not in by_id:
            raise ConfigError(f"{p}: slide_id {sid!r} is not in the cohort sheet")
        e = by_id[sid]
        jobs.append(SlideJob(Path(p), e.path, e.backend or backend, e.mpp))
    return jobs


# --- reading -------------------------------------------------------------------------------


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Patch counts per split and slide, and per label (patches containing it, valid crops)."""
    root = open_dataset(path)
    a = dict(root.attrs)
    split = np.asarray(root["split"][:])
    slide = read_strings(root["slide_id"])
    labels = np.asarray(root["crop_labels"][:])
    valid = np.asarray(root["crop_valid"][:])
    names = list(a.get("label_names") or [])
    per_split = {}
    for code, name in enumerate(SPLITS):
        sel = split == code
        per_split[name] = {"patches": int(sel.sum()), "slides": sorted(set(slide[sel].tolist()))}
    per_label = {}
    for value in np.unique(labels[labels > 0]):
        in_patch = (labels == value).any(axis=1)
        per_label[int(value)] = {
            "name": names[value] if value < len(names) else str(value),
            "patches": int(in_patch.sum()),
            "valid_crops": int(((labels == value) & valid).sum()),
            **{f"patches_{s}": int((in_patch & (split == i)).sum()) for i, s in enumerate(SPLITS)},
        }
    return {"path": str(path), "n_patches": int(len(split)), "patch_size": a.get("patch_size"), "mpp": a.get("mpp"),
            "source": a.get("source"), "num_labels": a.get("num_labels"), "levels": a.get("levels"),
            "splits": per_split, "empty_slides": a.get("empty_slides", []),
            "failed_slides": a.get("failed_slides", {}), "labels": per_label}


def read_strings(array: zarr.Array) -> np.ndarray:
    """A zarr string array as a numpy ``<U`` array (zarr returns numpy StringDType)."""
    values = array[:].tolist()
    return np.array(values, dtype=str) if values else np.zeros(0, dtype=str)


def open_dataset(path: str | Path) -> zarr.Group:
    """Open a dataset store read-only (HistopipeError naming it when it is not one)."""
    try:
        root = zarr.open_group(str(path), mode="r")
        _ = root["images"], root["split"], root["level_luts"]
    except Exception as err:
        raise HistopipeError(f"{path}: not a readable patch dataset store: {err}") from None
    return root


def __getattr__(name: str) -> Any:
    # PatchDataset needs torch, whose import costs seconds: the CLI commands that only write
    # stores do not pay for it.
    if name == "PatchDataset":
        from histopipe.patch_dataset import PatchDataset

        return PatchDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
