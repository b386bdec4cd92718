"""Synthesis of image–label pairs from a trained pipeline, in batches, resumably.

Three sources of conditions (``histopipe synthesize --mode``):

- ``held-out``: maps of a patch-store split with their own crops (cut from the real patch at
  the stored boxes);
- ``user-map``: PNG maps of tissue-type ids with crop images per tissue type
  (``CROPS/<label>/*.png``, label = map value or label name), placed inside their regions;
- ``crop-bank``: maps of a patch-store split with crops drawn from the crop bank.

Output folder: ``synthetic.zarr`` (laid out like a training-patch store, contract #4, so it
reads back with the same reader: images, maps, crop boxes/labels, slide ids, split = train,
plus ``seed``, ``present`` = the region-wise labels of each image, ``crop_canvas`` = the
crops each image was conditioned on, pasted at their boxes on black, and ``source_index`` =
the patch-store row whose map it was drawn for, -1 for user maps), ``images/<id>.png`` and
``labels/<id>.png`` (16-bit ids) and ``manifest.csv`` / ``manifest.json`` (map source, crop
sources, seed, sampler, steps, guidance). Item i uses seed ``seed + i`` and its own crop
placement generator, so results do not depend on batch size or on resumption; finished
batches are kept in ``parts/`` until the run completes, and a rerun skips them. With
``synthesis.gpus: N`` the command runs in N processes (torchrun), each making every N-th
batch; the main process assembles the store, identical to a one-process run's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from histopipe.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from histopipe.diffusion.conditioning import PlacedCrop, slots_from_placed
from histopipe.diffusion.data import BankCrops, PatchRows, center_square
from histopipe.diffusion.pipeline import HistoSynthesisPipeline
from histopipe.diffusion.settings import SynthesisSettings
from histopipe.distributed import barrier, process_group
from histopipe.errors import HistopipeError
from histopipe.regions import largest_square, sample_square

log = logging.getLogger(__name__)

MODES = ("held-out", "user-map", "crop-bank")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MANIFEST_FIELDS = (
    "id", "image", "label", "map_source", "crop_sources", "crop_boxes", "slide_id",
    "seed", "sampler", "steps", "guidance_scale", "guidance_null", "level",
)


@dataclass
class SynthesisItem:
    """One image to make: its map (H, W) tissue-type ids, placed crops, seed and provenance."""

    item_id: str
    map: np.ndarray
    crops: list[PlacedCrop] = field(default_factory=list)
    seed: int = 0
    map_source: str = ""
    slide_id: str = ""
    source_index: int = -1  # row of the patch store whose map this is (-1: a user map)


def item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def place_crops(
    label_map: np.ndarray,
    pick: Callable[[int], tuple[np.ndarray, str] | None],
    max_crops: int,
    rng: np.random.Generator,
    min_side: int = 8,
) -> list[PlacedCrop]:
    """One crop per region present (largest regions first, up to ``max_crops``), placed inside it.

    ``pick(label)`` returns a crop (uint8 (s, s, 3)) and its source name, or None. A crop larger
    than the region's largest inscribed square is shrunk to fit; regions that cannot hold
    ``min_side`` px get none.
    """
    labels, counts = np.unique(label_map[label_map > 0], return_counts=True)
    placed: list[PlacedCrop] = []
    for label in labels[np.argsort(-counts, kind="stable")]:
        if len(placed) >= max_crops:
            break
        got = pick(int(label))
        if got is None:
            continue
        pixels, source = got
        mask = label_map == label
        side = min(pixels.shape[0], largest_square(mask))
        if side < min_side:
            continue
        pos = sample_square(mask, side, rng)
        placed.append(PlacedCrop(center_square(pixels, side), int(label), pos[0], pos[1], source))
    return placed


def held_out_items(
    store: PatchRows, max_crops: int, seed: int, limit: int | None = None, level: int = 0, repeats: int = 1,
) -> list[SynthesisItem]:
    """Maps of ``store`` (at map ``level``) with their own crops (the first ``max_crops`` valid
    ones), each ``repeats`` times with its own seed."""
    if not 0 <= level < len(store.level_luts):
        raise HistopipeError(f"{store.path}: map level {level} out of range ({len(store.level_luts)} levels)")
    lut = store.level_luts[level]
    items = []
    for i in range(len(store) if limit is None else min(limit, len(store))):
        r = store.raw(i)
        crops = []
        for k in np.flatnonzero(r["crop_valid"])[:max_crops]:
            y0, x0, s = (int(v) for v in r["crop_boxes"][k])
            crops.append(PlacedCrop(r["image"][y0 : y0 + s, x0 : x0 + s].copy(), int(lut[r["crop_labels"][k]]), y0, x0,
                                    f"{store.path.name}#{r['index']}:{y0},{x0},{s}"))
        label_map = lut[r["map"]].astype(np.uint16)
        for _ in range(repeats):
            j = len(items)
            items.append(SynthesisItem(f"{j:06d}", label_map, crops, seed + j, f"{store.path.name}#{r['index']}", store.slide_id(i), r["index"]))
    return items


def bank_items(store: PatchRows, bank: BankCrops, max_crops: int, seed: int, limit: int | None = None, min_side: int = 8) -> list[SynthesisItem]:
    """Maps of ``store`` with crops drawn at random from the crop bank, by region label."""
    items = []
    for i in range(len(store) if limit is None else min(limit, len(store))):
        r = store.raw(i)
        rng = item_rng(seed, i)

        def pick(label: int, rng=rng):
            if not bank.has(label):
                return None
            pixels, row = bank.draw(label, rng)
            return pixels, f"{bank.path.name}#{row}"

        crops = place_crops(r["map"], pick, max_crops, rng, min_side)
        items.append(SynthesisItem(f"{i:06d}", r["map"], crops, seed + i, f"{store.path.name}#{r['index']}", store.slide_id(i), r["index"]))
    return items


def read_label_png(path: Path) -> np.ndarray:
    """A map PNG of tissue-type ids (8- or 16-bit greyscale) → uint16 (H, W)."""
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except Exception as err:
        raise HistopipeError(f"{path}: cannot read the map image ({err})") from None
    if arr.ndim != 2:
        raise HistopipeError(f"{path}: a map must be a single-channel image of tissue-type ids, got shape {arr.shape}")
    return arr.astype(np.uint16)


def read_crop_folder(folder: Path, label_names: list[str]) -> dict[int, list[tuple[np.ndarray, str]]]:
    """``folder/<label>/*.png``: crops per tissue type; ``<label>`` is a map value or a label name."""
    if not folder.is_dir():
        raise HistopipeError(f"{folder}: crop folder not found")
    by_name = {name: i for i, name in enumerate(label_names)}
    crops: dict[int, list[tuple[np.ndarray, str]]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name.isdigit():
            label = int(sub.name)
        elif sub.name in by_name:
            label = by_name[sub.name]
        else:
            raise HistopipeError(f"{sub}: folder name is neither a tissue-type id nor a label name of the model ({', '.join(label_names) or 'none recorded'})")
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    rgb = np.array(im.convert("RGB"))
                crops.setdefault(label, []).append((center_square(rgb, min(rgb.shape[:2])), str(f)))
    if not crops:
        raise HistopipeError(f"{folder}: no crop images found (expected <label>/*.png)")
    return crops


def user_map_items(
    map_paths: list[Path], crops: dict[int, list[tuple[np.ndarray, str]]] | None, num_per_map: int,
    max_crops: int, seed: int, min_side: int = 8,
) -> list[SynthesisItem]:
    """``num_per_map`` items per user map, each with its own crop choice and placement."""
    items = []
    for path in map_paths:
        label_map = read_label_png(Path(path))
        for _ in range(num_per_map):
            i = len(items)
            rng = item_rng(seed, i)

            def pick(label: int, rng=rng):
                options = (crops or {}).get(label)
                return None if not options else options[int(rng.integers(len(options)))]

            placed = place_crops(label_map, pick, max_crops, rng, min_side) if crops else []
            items.append(SynthesisItem(f"{i:06d}", label_map, placed, seed + i, str(path), "user"))
    return items


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _fingerprint(meta: dict, items: list[SynthesisItem]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for it in items:
        h.update(it.item_id.encode())
        h.update(np.ascontiguousarray(it.map).tobytes())
        h.update(repr([(c.box, c.label, c.source) for c in it.crops]).encode())
        h.update(str(it.seed).encode())
    return h.hexdigest()


def synthesize(
    pipe: HistoSynthesisPipeline,
    items: list[SynthesisItem],
    out_dir: str | Path,
    s: SynthesisSettings,
    meta: dict | None = None,
    level_luts: np.ndarray | None = None,
) -> Path:
    """Generate every item into ``out_dir`` (see the module docstring); returns the manifest path.

    ``meta`` (model path, mode, inputs) goes into the manifest and the store's attributes;
    parts of an earlier run with different settings or items are discarded, not reused.
    """
    if not items:
        raise HistopipeError("nothing to synthesize: no maps were given or found")
    out_dir = Path(out_dir)
    size = pipe.image_size
    enc = pipe.condition_encoder
    known = None if enc is None else enc.level_num_labels[min(s.level, len(enc.level_num_labels) - 1)]
    for it in items:
        if it.map.shape != (size, size):
            raise HistopipeError(f"{it.map_source}: map is {it.map.shape[1]}×{it.map.shape[0]} px; the model makes {size}×{size} px images")
        if known is not None and int(it.map.max()) >= known:
            raise HistopipeError(f"{it.map_source}: tissue-type id {int(it.map.max())} unknown to the model (ids 0..{known - 1} at level {s.level})")
    meta = {**(meta or {}), "sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
            "guidance_null": s.guidance_null, "level": s.level, "variant": pipe.variant}
    parts = out_dir / "parts"
    fingerprint = _fingerprint({**meta, "batch_size": s.batch_size, "write_png": s.write_png}, items)
    stamp = parts / "fingerprint.txt"
    rank, world = process_group()
    if rank == 0:
        if parts.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            log.warning("%s: discarding parts of an earlier run with other settings", parts)
            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, fingerprint)
    barrier()
    pipe.use_sampler(s.sampler)
    pipe.set_progress_bar_config(disable=True)
    max_crops = max(int(pipe.config.max_crops), 1)
    device = pipe._execution_device
    n_batches = -(-len(items) // s.batch_size)
    # Whole batches, round robin over the processes: every image is made in the same batch
    # with the same seed whatever the number of processes, so the output is the same.
    for b in range(rank, n_batches, world):
        j = b * s.batch_size
        part = parts / f"batch-{b:06d}.npz"
        if part.is_file():
            continue
        batch = items[j : j + s.batch_size]
        slots = slots_from_placed([it.crops for it in batch], size, max_crops) if pipe.variant in ("map_crops", "map_crop_embeddings") else None
        gens = [torch.Generator(device=device).manual_seed(it.seed) for it in batch]
        out = pipe(
            np.stack([it.map for it in batch]).astype(np.int64), slots, num_images=len(batch), level=s.level,
            num_inference_steps=s.steps, guidance_scale=s.guidance_scale, guidance_null=s.guidance_null, generator=gens,
        )
        if s.write_png:
            for it, img in zip(batch, out.images, strict=True):
                atomic_write_bytes(out_dir / "images" / f"{it.item_id}.png", _png_bytes(img))
                atomic_write_bytes(out_dir / "labels" / f"{it.item_id}.png", _png_bytes(it.map.astype(np.uint16)))
        with atomic_path(part) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=out.images)
        log.info("synthesized batch %d of %d (%d images)", b + 1, n_batches, len(batch))
    barrier()
    if rank != 0:  # the main process assembles the store from every process's parts
        return out_dir / "manifest.csv"
    return _assemble(pipe, items, out_dir, s, meta, level_luts)


def _manifest_rows(items: list[SynthesisItem], s: SynthesisSettings, write_png: bool) -> list[dict]:
    rows = []
    for it in items:
        rows.append({
            "id": it.item_id,
            "image": f"images/{it.item_id}.png" if write_png else "",
            "label": f"labels/{it.item_id}.png" if write_png else "",
            "map_source": it.map_source,
            "crop_sources": [c.source for c in it.crops],
            "crop_boxes": [list(c.box) for c in it.crops],
            "slide_id": it.slide_id,
            "seed": it.seed,
            "sampler": s.sampler,
            "steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "guidance_null": s.guidance_null,
            "level": s.level,
        })
    return rows


def _assemble(pipe, items, out_dir: Path, s: SynthesisSettings, meta: dict, level_luts) -> Path:
    n, size = len(items), pipe.image_size
    # Crops are recorded even for variants that do not read them (their crop fidelity is the
    # null level of the measure).
    max_crops = max([int(pipe.config.max_crops), 1] + [len(it.crops) for it in items])
    num_labels = int(max(it.map.max() for it in items)) + 1
    if pipe.condition_encoder is not None:
        num_labels = max(num_labels, int(pipe.condition_encoder.level_num_labels[s.level]))
    label_names = list(pipe.config.label_names)
    with atomic_path(out_dir / "synthetic.zarr") as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        images = g.create_array("images", shape=(n, size, size, 3), chunks=(1, size, size, 3), dtype="uint8")
        j = 0
        for b in range(0, n, s.batch_size):
            imgs = np.load(out_dir / "parts" / f"batch-{b // s.batch_size:06d}.npz")["images"]
            images[j : j + len(imgs)] = imgs
            j += len(imgs)
        g.create_array("maps", data=np.stack([it.map.astype(np.uint16) for it in items]), chunks=(1, size, size))
        boxes = np.zeros((n, max_crops, 3), np.int32)
        labels = np.zeros((n, max_crops), np.uint16)
        valid = np.zeros((n, max_crops), bool)
        for i, it in enumerate(items):
            for k, c in enumerate(it.crops[:max_crops]):
                boxes[i, k], labels[i, k], valid[i, k] = c.box, c.label, True
        canvas = g.create_array("crop_canvas", shape=(n, size, size, 3), chunks=(1, size, size, 3), dtype="uint8")
        for i, it in enumerate(items):
            pasted = np.zeros((size, size, 3), np.uint8)
            for c in it.crops[:max_crops]:
                y0, x0, side = c.box
                pasted[y0 : y0 + side, x0 : x0 + side] = c.pixels
            canvas[i] = pasted
        g.create_array("crop_boxes", data=boxes)
        g.create_array("crop_labels", data=labels)
        g.create_array("crop_valid", data=valid)
        # Maps at a coarser level live in that level's label space: the source LUTs no longer apply.
        if level_luts is None or s.level:
            luts = np.arange(num_labels, dtype=np.int32)[None]
        else:
            luts = np.asarray(level_luts, np.int32)
        g.create_array("level_luts", data=luts)
        sid = g.create_array("slide_id", shape=(n,), dtype=str)
        sid[:] = np.array([it.slide_id for it in items], dtype=object)
        iid = g.create_array("item_id", shape=(n,), dtype=str)
        iid[:] = np.array([it.item_id for it in items], dtype=object)
        g.create_array("coords", data=np.zeros((n, 2), np.int64))
        g.create_array("split", data=np.zeros(n, np.uint8))
        g.create_array("seed", data=np.array([it.seed for it in items], np.int64))
        g.create_array("source_index", data=np.array([it.source_index for it in items], np.int64))
        present = np.zeros((n, num_labels), bool)
        for i, it in enumerate(items):
            present[i, np.unique(it.map)] = True
        g.create_array("present", data=present)
        g.attrs.update(
            patch_size=size, mpp=pipe.config.mpp, num_labels=num_labels, label_names=label_names,
            levels=[], max_crops=max_crops, splits={}, source="synthetic", **{k: v for k, v in meta.items() if k != "source"},
        )
    rows = _manifest_rows(items, s, s.write_png)
    atomic_write_text(out_dir / "manifest.json", json.dumps({"meta": meta, "items": rows}, indent=1, default=str))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "crop_sources": json.dumps(r["crop_sources"]), "crop_boxes": json.dumps(r["crop_boxes"])})
    atomic_write_text(out_dir / "manifest.csv", buf.getvalue())
    shutil.rmtree(out_dir / "parts", ignore_errors=True)
    return out_dir / "manifest.csv"
