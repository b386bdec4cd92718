"""Tissue types: ``sample-embeddings``, ``fit-clusters``, ``assign-clusters``,
``annotation-map``, ``cluster-montage``, ``train-student``, ``predict-tissue-types``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from histopipe.config import json_overrides, load_config, section
from histopipe.errors import ConfigError, HistopipeError

log = logging.getLogger(__name__)
# faiss logs at INFO which CPU instruction set it loads; not worth a line per command.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

BACKENDS = ["auto", "openslide", "tiffslide"]


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "sample-embeddings", help="diversity-sample one slide's embedding store for fitting tissue types",
        description=(
            "Choose up to PER_SLIDE_CAP tiles (count) of one slide covering its embedding space (nearest "
            "tiles to per-slide k-means centroids), order them by farthest-point traversal so that every "
            "prefix is itself a covering subset, and write a small sample store (features float32 (m, D), "
            "normalised; rows int64 (m,)) that fit-clusters --samples reads instead of the embedding store."),
    )
    e.add_argument("embeddings", type=Path, help="embedding store (.zarr) of the slide")
    e.add_argument("--out", type=Path, required=True, help="output sample store (.zarr)")
    _config_args(e)
    _sampling_args(e)
    e.set_defaults(func=run_sample)

    b = sub.add_parser(
        "summarize-samples", help="summarise a batch of per-slide sample stores into weighted sub-centroids",
        description=(
            "Level one of the two-level fit: k-means on every sampled tile of a batch of slides' sample "
            "stores (from sample-embeddings) into at most BATCH_CENTROIDS weighted sub-centroids (each with "
            "its member count and their summed squared distance), written as a summary store that "
            "fit-clusters --summaries reads. A batch with at most BATCH_CENTROIDS sampled tiles keeps them "
            "as they are; a batch without sampled tiles (failed tiling) gives an empty summary."),
    )
    b.add_argument("--samples", nargs="+", type=Path, default=[], help="sample stores (.zarr) of the batch's slides")
    b.add_argument("--samples-list", type=Path, default=None, help="text file with one sample store path per line")
    b.add_argument("--out", type=Path, required=True, help="output summary store (.zarr)")
    _config_args(b)
    _sampling_args(b)
    b.add_argument("--batch-centroids", type=int, default=None, help="most sub-centroids per batch (default 256)")
    b.set_defaults(func=run_summarize)

    f = sub.add_parser(
        "fit-clusters", help="fit tissue types (k-means) on a cohort's embedding stores or per-slide samples",
        description=(
            "Sample up to PER_SLIDE_CAP tiles per slide (nearest tiles to per-slide k-means centroids, "
            "covering the slide's embedding space) and at most TOTAL_CAP in all, reading one slide at a "
            "time, or read each slide's prefix of its quota from sample stores (--samples, from "
            "sample-embeddings: the same sample, without opening the embedding stores); fit faiss k-means "
            "with K clusters, re-split high-variance clusters, and build nested coarser LEVELS from one "
            "Ward tree over the centroids. With --summaries (from summarize-samples, one per batch of "
            "slides) every sampled tile counts instead: k-means on the batches' weighted sub-centroids, "
            "then REFINE_PASSES passes over every sampled tile of the sample stores, in bounded memory. "
            "Writes a model folder (centroids.npy, level_luts.npy, model.json)."),
    )
    f.add_argument("embeddings", nargs="*", type=Path, help="embedding stores (.zarr), one per slide")
    f.add_argument("--list", type=Path, default=None, help="text file with one embedding store path per line (for large cohorts)")
    f.add_argument("--samples", nargs="+", type=Path, default=[], help="sample stores (.zarr) from sample-embeddings, one per slide")
    f.add_argument("--samples-list", type=Path, default=None, help="text file with one sample store path per line")
    f.add_argument("--summaries", nargs="+", type=Path, default=[],
                   help="batch summaries (.zarr) from summarize-samples: the two-level fit (needs the sample stores too)")
    f.add_argument("--summaries-list", type=Path, default=None, help="text file with one batch summary path per line")
    f.add_argument("--out", type=Path, required=True, help="output model folder")
    _config_args(f)
    f.add_argument("--k", type=int, default=None, help="number of tissue types (default 100)")
    f.add_argument("--levels", default=None, help="comma-separated type counts per level, including k (default 5,10,20,50,100)")
    f.add_argument("--niter", type=int, default=None, help="k-means iterations (default 25)")
    _sampling_args(f)
    f.add_argument("--total-cap", type=int, default=None, help="most tiles sampled from the cohort (default 200000)")
    f.add_argument("--resplit-factor", type=float, default=None, help="re-split clusters whose variance exceeds this × the median; 0 disables (default 3)")
    f.add_argument("--workers", type=int, default=None, help="processes sampling embedding stores in parallel (default 1)")
    f.add_argument("--batch-centroids", type=int, default=None, help="sub-centroids per batch the summaries were made with (default 256)")
    f.add_argument("--refine-passes", type=int, default=None, help="two-level fit: Lloyd passes over every sampled tile (default 2)")
    f.set_defaults(func=run_fit)

    a = sub.add_parser(
        "assign-clusters", help="tissue-type map of one slide from a cluster model",
        description=(
            "Assign every tile of a slide to the model's tissue types at every level and write the map "
            "store (uint16 (levels, H, W) at tile resolution, 0 = background), optionally a PNG overlay "
            "on the slide thumbnail and QuPath GeoJSON polygons (level-0 px) per type."),
    )
    a.add_argument("model", type=Path, help="cluster model folder (from fit-clusters)")
    a.add_argument("embeddings", type=Path, help="embedding store (.zarr) of the slide")
    a.add_argument("tiles", type=Path, help="tile store (.zarr) of the slide")
    a.add_argument("--out", type=Path, required=True, help="output map store (.zarr)")
    _view_args(a)
    a.set_defaults(func=run_assign)

    n = sub.add_parser(
        "annotation-map", help="tissue map of one slide from its annotation file",
        description=(
            "Rasterise real labels on the tile grid: Camelyon16/ASAP XML polygons (0 background, "
            "1 normal tissue, 2 tumour) or a PANDA-style label mask (.tif/.tiff/.png, labels in the "
            "first channel, any downsample of the slide)."),
    )
    n.add_argument("slide", type=Path, help="whole-slide image (for the PNG overlay)")
    n.add_argument("annotation", type=Path, help="annotation: ASAP .xml or label mask .tif/.tiff/.png")
    n.add_argument("--tiles", type=Path, required=True, help="tile store (.zarr) of the slide: the map's grid and tissue cells")
    n.add_argument("--out", type=Path, required=True, help="output map store (.zarr)")
    n.add_argument("--labels", default=None,
                   help="label names, index = label value: a preset (camelyon, panda_radboud, panda_karolinska) or a comma list starting with background")
    _view_args(n, slide=False)
    n.set_defaults(func=run_annotation)

    m = sub.add_parser(
        "cluster-montage", help="PNG of example tiles per tissue type across a cohort",
        description="One row per type: its name, colour and PER_TYPE example tiles drawn from as many different slides as possible.",
    )
    m.add_argument("--maps", nargs="*", type=Path, default=[], help="map stores (.zarr)")
    m.add_argument("--tiles", nargs="*", type=Path, default=[], help="tile stores (.zarr), same order as --maps")
    m.add_argument("--list", type=Path, default=None, help="TSV file with 'map<TAB>tiles' per line (instead of --maps/--tiles)")
    m.add_argument("--out", type=Path, required=True, help="output PNG")
    m.add_argument("--per-type", type=int, default=8, help="example tiles per type (default 8)")
    m.add_argument("--thumb", type=int, default=96, help="side of each example in the PNG, px (default 96)")
    m.add_argument("--level", type=int, default=0, help="map level (0 = finest) (default 0)")
    m.add_argument("--seed", type=int, default=0, help="seed of the example choice (default 0)")
    m.set_defaults(func=run_montage)

    register_student(sub)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="config YAML with a clustering section (flags override it)")
    p.add_argument("--config-json", default=None, help="config sections as JSON, merged over --config (used by the workflow)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # Shared by sample-embeddings and fit-clusters: the fit checks that the samples used the same.
    p.add_argument("--seed", type=int, default=None, help="seed of sampling and k-means (default 0)")
    p.add_argument("--per-slide-cap", type=int, default=None, help="most tiles sampled per slide (default 1000)")
    p.add_argument("--normalize", choices=["l2", "none"], default=None, help="l2: cosine (spherical) k-means; none: Euclidean (default l2)")


def _view_args(p: argparse.ArgumentParser, slide: bool = True) -> None:
    p.add_argument("--png", type=Path, default=None, help="write a PNG overlay of the map on the slide thumbnail")
    p.add_argument("--geojson", type=Path, default=None, help="write QuPath GeoJSON polygons (level-0 px), one annotation per type")
    p.add_argument("--level", type=int, default=0, help="map level drawn in the PNG and GeoJSON (0 = finest) (default 0)")
    p.add_argument("--max-side", type=int, default=1024, help="longest side of the PNG, px (default 1024)")
    if slide:
        p.add_argument("--slide", type=Path, default=None, help="slide file for the PNG (default: the tile store's slide_path)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="slide reader (default: the tile store's)")


def cluster_config(args: argparse.Namespace):
    """The ``clustering`` section from --config/--config-json with flags applied."""
    from histopipe.clustering import ClusterConfig

    cfg = load_config(args.config, json_overrides(args.config_json))
    names = ("k", "seed", "niter", "per_slide_cap", "total_cap", "normalize", "resplit_factor", "workers",
             "batch_centroids", "refine_passes")
    flags = {name: getattr(args, name, None) for name in names}  # each command has a subset of the flags
    if getattr(args, "levels", None) is not None:
        try:
            flags["levels"] = tuple(int(v) for v in args.levels.split(","))
        except ValueError:
            raise ConfigError(f"--levels {args.levels!r}: expected comma-separated integers") from None
    base = section(cfg, "clustering", ClusterConfig)
    return replace(base, **{k: v for k, v in flags.items() if v is not None})


def _read_list(path: Path, columns: int) -> list[list[Path]]:
    if not path.is_file():
        raise HistopipeError(f"{path}: list file not found")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != columns:
            raise HistopipeError(f"{path}:{lineno}: expected {columns} tab-separated path(s), got {len(parts)}")
        rows.append([(path.parent / p.strip()) if not Path(p.strip()).is_absolute() else Path(p.strip()) for p in parts])
    return rows


def run_sample(args: argparse.Namespace) -> int:
    from histopipe.sampling import sample_slide
    from histopipe.slide_samples import write_sample

    cfg = cluster_config(args)
    sample = sample_slide(args.embeddings, cfg.per_slide_cap, cfg.seed, cfg.normalize)
    write_sample(args.out, sample, cfg.per_slide_cap, cfg.seed, cfg.normalize)
    print(f"{sample.info.slide_id}: {len(sample.rows)} of {sample.info.n} tiles sampled (cap {cfg.per_slide_cap}) -> {args.out}")
    return 0


def _paths(given: list[Path], list_file: Path | None) -> list[Path]:
    return list(given) + ([r[0] for r in _read_list(list_file, 1)] if list_file else [])


def run_summarize(args: argparse.Namespace) -> int:
    from histopipe.summaries import summarize_batch, write_summary

    cfg = cluster_config(args)
    samples = _paths(args.samples, args.samples_list)
    if not samples:
        raise HistopipeError("summarize-samples: no sample stores given (--samples or --samples-list)")
    summary = summarize_batch(samples, cfg)
    write_summary(args.out, summary)
    a = summary.attrs
    kept = " (the tiles themselves)" if a["exact"] else ""
    empty = f", {len(a['empty_slides'])} slide(s) without sampled tiles" if a["empty_slides"] else ""
    print(f"{len(a['slides'])} slides, {a['n_sampled']} sampled tiles -> {len(summary.centroids)} sub-centroids"
          f"{kept}{empty} -> {args.out}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from histopipe.clustering import fit, fit_samples
    from histopipe.summaries import fit_two_level

    cfg = cluster_config(args)
    stores = _paths(args.embeddings, args.list)
    samples = _paths(args.samples, args.samples_list)
    summaries = _paths(args.summaries, args.summaries_list)
    if summaries and not samples:
        raise HistopipeError("fit-clusters --summaries: the sample stores are needed too (--samples or --samples-list)")
    if stores and samples:
        raise HistopipeError("fit-clusters: give embedding stores (positional paths, --list) or sample stores "
                             "(--samples, --samples-list), not both")
    if not stores and not samples:
        raise HistopipeError("fit-clusters: no inputs given (embedding stores: positional paths or --list; "
                             "sample stores: --samples or --samples-list)")
    if summaries:
        model = fit_two_level(samples, summaries, cfg)
    else:
        model = fit_samples(samples, cfg) if samples else fit(stores, cfg)
    model.save(args.out)
    m = model.meta
    print(f"k={model.k} levels={model.levels} from {m['n_sampled']} of {m['n_tiles_total']} tiles "
          f"({m['n_slides']} slides, dim {model.dim}, {len(m['resplit'])} re-split) -> {args.out}")
    return 0


def _views(args: argparse.Namespace, tmap, slide: Path | None) -> None:
    from histopipe.tissuemap import overlay_png, write_geojson

    if not 0 <= args.level < tmap.labels.shape[0]:
        raise HistopipeError(f"--level {args.level}: the map has {tmap.labels.shape[0]} level(s)")
    if args.geojson is not None:
        write_geojson(args.geojson, tmap, args.level)
    if args.png is not None:
        backend = args.backend or tmap.attrs.get("backend") or "auto"
        overlay_png(args.png, tmap, slide, args.level, args.max_side, backend=backend)


def run_assign(args: argparse.Namespace) -> int:
    from histopipe.clustering import ClusterModel
    from histopipe.tissuemap import kmeans_map, write_map

    model = ClusterModel.load(args.model)
    tmap = kmeans_map(model, args.embeddings, args.tiles, args.model)
    write_map(args.out, tmap)
    _views(args, tmap, args.slide or Path(tmap.attrs["slide_path"]))
    print(f"{tmap.attrs['slide_id']}: {tmap.attrs['n_tiles']} tiles -> map {tuple(tmap.labels.shape)} -> {args.out}")
    return 0


def run_annotation(args: argparse.Namespace) -> int:
    from histopipe.annotations import LABEL_PRESETS, annotation_map
    from histopipe.tissuemap import write_map

    names = None
    if args.labels:
        names = LABEL_PRESETS.get(args.labels) or [s.strip() for s in args.labels.split(",")]
    tmap = annotation_map(args.annotation, args.tiles, names)
    write_map(args.out, tmap)
    _views(args, tmap, args.slide)
    print(f"{tmap.attrs['slide_id']}: annotation {args.annotation.name} -> map {tuple(tmap.labels.shape)}, "
          f"{tmap.attrs['num_labels']} labels -> {args.out}")
    return 0


def run_montage(args: argparse.Namespace) -> int:
    from histopipe.montage import cohort_montage

    pairs = _pairs(args, "cluster-montage")
    image = cohort_montage(args.out, pairs, args.per_type, args.thumb, args.level, args.seed)
    print(f"montage of {image.shape[0] // args.thumb} types from {len(pairs)} slides -> {args.out}")
    return 0


def register_student(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train-student", help="train a light CNN to predict tissue types from tile pixels",
        description=(
            "Train a timm classifier on (tile pixels, finest tissue type) of k-means maps, holding out "
            "whole slides (val_fraction), and report its agreement with the k-means types per level. "
            "Writes a folder with model.safetensors, student.json and metrics.json."),
    )
    t.add_argument("--maps", nargs="*", type=Path, default=[], help="map stores (.zarr) from assign-clusters")
    t.add_argument("--tiles", nargs="*", type=Path, default=[], help="tile stores (.zarr), same order as --maps")
    t.add_argument("--list", type=Path, default=None, help="TSV file with 'map<TAB>tiles' per line (instead of --maps/--tiles)")
    t.add_argument("--out", type=Path, required=True, help="output student folder")
    _config_args(t)
    t.add_argument("--seed", type=int, default=None, help="seed of the slide split, tile draw and training (default: clustering.seed)")
    t.add_argument("--epochs", type=int, default=None, help="passes over the training tiles (default 10)")
    t.add_argument("--batch-size", type=int, default=None, help="tiles per step (default 64)")
    t.add_argument("--tile-size", type=int, default=None, help="input side in px the tiles are resized to (default 128)")
    t.add_argument("--device", default=None, help="torch device (default cpu)")
    t.set_defaults(func=run_train_student)

    p = sub.add_parser(
        "predict-tissue-types", help="tissue-type map of one slide from a student (no embeddings)",
        description="Label every tile of a slide with a trained student and write the map store (and optional PNG/GeoJSON views).",
    )
    p.add_argument("student", type=Path, help="student folder (from train-student)")
    p.add_argument("tiles", type=Path, help="tile store (.zarr) of the slide")
    p.add_argument("--out", type=Path, required=True, help="output map store (.zarr)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _view_args(p)
    p.set_defaults(func=run_predict_student)


def _pairs(args: argparse.Namespace, what: str) -> list[tuple[Path, Path]]:
    if args.list is not None:
        return [(r[0], r[1]) for r in _read_list(args.list, 2)]
    if len(args.maps) != len(args.tiles):
        raise HistopipeError(f"{what}: {len(args.maps)} --maps but {len(args.tiles)} --tiles (give them in the same order)")
    return list(zip(args.maps, args.tiles, strict=True))


def run_train_student(args: argparse.Namespace) -> int:
    from histopipe.student import StudentConfig, train_student

    cfg = load_config(args.config, json_overrides(args.config_json))
    student_cfg = StudentConfig.from_config(cfg)
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "tile_size": args.tile_size, "device": args.device}
    student_cfg = replace(student_cfg, **{k: v for k, v in flags.items() if v is not None})
    seed = args.seed if args.seed is not None else int(cfg["clustering"]["seed"])
    student, metrics = train_student(_pairs(args, "train-student"), student_cfg, seed)
    student.save(args.out)
    print(f"student {student.meta['architecture']}: agreement {metrics['agreement']} on {metrics['val_tiles']} held-out tiles "
          f"({metrics['val_slides']} slides), per level {metrics['agreement_per_level']} -> {args.out}")
    return 0


def run_predict_student(args: argparse.Namespace) -> int:
    from histopipe.student import StudentModel, student_map
    from histopipe.tissuemap import write_map

    student = StudentModel.load(args.student)
    tmap = student_map(student, args.tiles, args.student, args.device)
    write_map(args.out, tmap)
    _views(args, tmap, args.slide or Path(tmap.attrs["slide_path"]))
    print(f"{tmap.attrs['slide_id']}: {tmap.attrs['n_tiles']} tiles labelled by the student -> {args.out}")
    return 0
