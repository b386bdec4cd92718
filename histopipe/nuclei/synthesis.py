"""Synthesize a nuclei dataset with a trained ``NucleiPipeline``.

Layouts come from the held-out point maps of the store's test split (``source: test``) or
from the HistoSmith layout model given cell-type counts and a tissue (``source: counts``).
Output folder ``out``:

- ``parts/part-<i>.npz``: one finished batch each, written atomically and kept until the run
  completes; a rerun with the same plan (``parts/plan.json``: model, settings, layouts and
  seeds) skips the parts present, so an interrupted job resumes where it stopped (item i
  always uses seed + i, so the result does not depend on where it was interrupted);
- ``nuclei.zarr``: the triplets in Part A's store format (``NucleiStoreWriter``, split train).
  The writer derives distance and points from the separated instances, so the store's
  ``points`` are the centroids of the nuclei made, not the layout they were asked for;
- ``png/<name>_image.png``, ``_semantic.png`` (class ids), ``_instances.png`` (16-bit ids);
- ``manifest.tsv``: one row per image, written last: name, tissue, source, seed, ``nuclei``
  (instances made) and ``n_<class>`` (nuclei per class of the conditioning layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histopipe.atomic import atomic_path, atomic_write_text
from histopipe.errors import HistopipeError
from histopipe.nuclei.labels import instance_classes, point_raster, points_from_raster, semantic_map
from histopipe.nuclei.layout import LayoutModel, fit_layout, parse_counts
from histopipe.nuclei.pipeline import NucleiPipeline
from histopipe.nuclei.readers import NucleiSample
from histopipe.nuclei.settings import NucleiSynthesisSettings, layout_settings, synthesis_settings
from histopipe.nuclei.store import SPLITS, NucleiStoreWriter, open_nuclei_store
from histopipe.nuclei.training import load_nuclei_pipeline

log = logging.getLogger(__name__)
STORE_NAME = "nuclei.zarr"
MANIFEST = "manifest.tsv"


def _test_layouts(store: str | Path, pipe: NucleiPipeline, limit: int | None) -> list[tuple[str, np.ndarray, int, str]]:
    """The point maps of the store's test split, with tissue ids mapped by name onto the model's."""
    g = open_nuclei_store(store)
    classes, tissues = list(g.attrs["class_names"]), list(g.attrs["tissue_names"])
    if classes != list(pipe.config.class_names):
        raise HistopipeError(f"{store}: classes {classes} differ from the model's {list(pipe.config.class_names)}")
    if "points" not in g:
        raise HistopipeError(f"{store}: an image-only nuclei store has no test point maps")
    size = pipe.image_size
    if int(g.attrs["patch_size"]) != size:
        raise HistopipeError(f"{store}: {g.attrs['patch_size']} px patches; the model makes {size}×{size} px")
    model_tissues = list(pipe.config.tissue_names)
    split, tissue_ids = np.asarray(g["split"][:]), np.asarray(g["tissue"][:])
    layouts = []
    for i in np.flatnonzero(split == SPLITS.index("test"))[:limit]:
        name = tissues[int(tissue_ids[i])]
        if name not in model_tissues:
            raise HistopipeError(f"{store}: test patch {i} is of tissue {name!r}, unknown to the model ({model_tissues})")
        layouts.append((f"test{i:06d}", np.asarray(g["points"][i]).astype(np.uint8), model_tissues.index(name), "test"))
    return layouts


def plan_layouts(
    s: NucleiSynthesisSettings, store: str | Path, pipe: NucleiPipeline, layout: LayoutModel | None,
    counts: str | dict | None, tissue: str | None,
) -> list[dict]:
    """Work items {name, points (S, S) uint8 raster, tissue id (the model's), seed, source}, in a fixed order."""
    size = pipe.image_size
    tissues = list(pipe.config.tissue_names)
    if s.source == "test" and counts is None and tissue is None:
        layouts = _test_layouts(store, pipe, s.limit)
    else:
        if layout is None:
            raise HistopipeError("synthesis from counts needs a layout model")
        wanted = parse_counts(counts, pipe.config.class_names) if isinstance(counts, str) else counts
        names = [tissue] if tissue else tissues
        for name in names:
            if name not in tissues:
                raise HistopipeError(f"unknown tissue {name!r}; the model knows {tissues}")
        layouts = []
        for i in range(min(s.num_images, s.limit or s.num_images)):
            name = names[i % len(names)]
            pts = layout.sample(name, wanted, size, np.random.default_rng(s.seed + i))
            layouts.append((f"counts{i:06d}", point_raster(pts, (size, size)), tissues.index(name), "counts"))
    items = []
    for name, raster, t, source in layouts:
        for j in range(s.num_per_layout):
            items.append({"name": f"{name}_{j}", "points": raster, "tissue": t, "source": source, "seed": s.seed + len(items)})
    return items


def _run_part(pipe: NucleiPipeline, items: list[dict], s: NucleiSynthesisSettings, path: Path) -> None:
    device = pipe._execution_device
    gens = [torch.Generator(device=device).manual_seed(it["seed"]) for it in items]
    out = pipe(
        np.stack([it["points"] for it in items]), [it["tissue"] for it in items], guidance_scale=s.guidance_scale,
        num_inference_steps=s.steps, generator=gens, sampler=s.sampler, instance_method=s.instance_method,
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=out.images, semantic=out.semantic, distance=out.distance, instances=out.instances, points=out.points)


def _write_png(folder: Path, name: str, image: np.ndarray, semantic: np.ndarray, instances: np.ndarray) -> None:
    for suffix, arr in (("image", image), ("semantic", semantic), ("instances", instances.astype(np.uint16))):
        with atomic_path(folder / f"{name}_{suffix}.png") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")


def synthesize_nuclei(
    cfg: dict, model_dir: str | Path, store: str | Path, out: str | Path,
    counts: str | dict | None = None, tissue: str | None = None, layout: str | Path | LayoutModel | None = None,
) -> Path:
    """Synthesize triplets into ``out`` (see the module docstring); returns ``out``.

    ``counts`` ("neutrophil=12,epithelial=80" or a dict) and/or ``tissue`` switch to layouts
    from the layout model (``layout``: a LayoutModel, its JSON, or None to fit one on the
    store's train split, saved as ``out/layout.json``).
    """
    s = synthesis_settings(cfg)
    counts = counts if counts is not None else s.counts
    tissue = tissue if tissue is not None else s.tissue
    out = Path(out)
    pipe = load_nuclei_pipeline(model_dir, "cuda" if torch.cuda.is_available() else None)
    if s.source == "counts" or counts is not None or tissue is not None:
        if isinstance(layout, (str, Path)):
            layout = LayoutModel.load(layout)
        elif layout is None:
            layout = LayoutModel.load(fit_layout(store, out / "layout.json", layout_settings(cfg)))
    items = plan_layouts(s, store, pipe, layout, counts, tissue)
    if not items:
        raise HistopipeError(f"{store}: nothing to synthesize (no test point maps / no layouts)")
    parts = out / "parts"
    _check_plan(parts, model_dir, s, items)
    batches = [items[i : i + s.batch_size] for i in range(0, len(items), s.batch_size)]
    for b, batch in enumerate(batches):
        path = parts / f"part-{b:05d}.npz"
        if path.is_file():
            continue  # finished by an earlier run
        _run_part(pipe, batch, s, path)
        log.info("synthesized %s (%d/%d)", path.name, b + 1, len(batches))
    _assemble(pipe, items, [parts / f"part-{b:05d}.npz" for b in range(len(batches))], s, out)
    shutil.rmtree(parts)
    return out


def _check_plan(parts: Path, model_dir: str | Path, s: NucleiSynthesisSettings, items: list[dict]) -> None:
    """Keep finished parts only if they were made by the same plan; else start over."""
    plan = {
        "model": str(Path(model_dir).resolve()),
        "settings": asdict(s),
        "items": [[it["name"], it["tissue"], it["seed"], hashlib.sha1(it["points"].tobytes()).hexdigest()] for it in items],
    }
    text = json.dumps(plan, sort_keys=True)
    path = parts / "plan.json"
    if path.is_file() and path.read_text() != text:
        log.warning("%s: made by another plan; starting over", parts)
        shutil.rmtree(parts)
    if not path.is_file():
        atomic_write_text(path, text)


def _assemble(pipe: NucleiPipeline, items: list[dict], part_files: list[Path], s: NucleiSynthesisSettings, out: Path) -> None:
    """Store, PNGs and manifest from the finished parts (the manifest last: it marks completion)."""
    class_names, tissue_names = list(pipe.config.class_names), list(pipe.config.tissue_names)
    header = ["name", "tissue", "source", "seed", "nuclei", *[f"n_{c}" for c in class_names[1:]]]
    rows = ["\t".join(header)]
    it = iter(items)
    with NucleiStoreWriter(out / STORE_NAME, pipe.image_size, class_names, tissue_names) as writer:
        for path in part_files:
            with np.load(path) as part:
                arrays = {k: part[k] for k in part.files}
            for i in range(len(arrays["images"])):
                item = next(it)
                name, tname = item["name"], tissue_names[item["tissue"]]
                image, instances = arrays["images"][i], arrays["instances"][i]
                # As in the real stores (readers.py), each nucleus gets its majority class and
                # foreground no instance holds (blobs under separate_instances' min_size) is
                # background, so semantic, instances, distance and points agree.
                semantic = semantic_map(instances, instance_classes(instances, arrays["semantic"][i]))
                writer.add(NucleiSample(name=name, image=image, instances=instances, semantic=semantic, tissue=tname), "train")
                if s.write_png:
                    _write_png(out / "png", name, image, semantic, instances)
                # n_<class>: the layout's nuclei (what was asked for); nuclei: the instances made.
                per_class = np.bincount(points_from_raster(arrays["points"][i])[:, 2], minlength=len(class_names))[1:]
                rows.append("\t".join(map(str, [name, tname, item["source"], item["seed"], int(instances.max()), *per_class.tolist()])))
    atomic_write_text(out / MANIFEST, "\n".join(rows) + "\n")
