"""``histopipe build-dataset``, ``extract-patches``, ``merge-patches``, ``crop-bank``, ``dataset-info``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from histopipe.config import json_overrides, load_config, section
from histopipe.errors import ConfigError, HistopipeError
from histopipe.patches import PatchConfig

log = logging.getLogger(__name__)

_UNITS = ("Patches are patch_size px at mpp µm/px (config section `patches`), stored at output_size px; "
          "coordinates are level-0 px (x, y); crop boxes are (y0, x0, side) in stored-image px.")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="config YAML (section `patches`)")
    p.add_argument("--config-json", default=None, help="config sections as JSON, merged over --config (used by the workflow)")


def _list_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--list", type=Path, default=None, help=f"text file with one {what} path per line (added to those given)")


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "build-dataset", help="cut heterogeneous patches + visual crops from a cohort into one dataset store",
        description=("Cut heterogeneous training patches from every slide of the given tissue-type map stores "
                     "(slides found by the maps' slide_id in the cohort sheet), take one visual crop per region, "
                     "split the slides into train/val/test and write the dataset store (zarr). " + _UNITS))
    b.add_argument("--maps", type=Path, nargs="*", default=[], help="map stores (.zarr), one per slide")
    _list_arg(b, "map store")
    b.add_argument("--sheet", type=Path, required=True, help="cohort sheet (TSV) with the slides' paths")
    b.add_argument("--out", type=Path, required=True, help="output dataset store, e.g. results/dataset/NAME/patches.zarr")
    b.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide"],
                   help="reader for slides whose sheet row names none (default: auto)")
    _config_args(b)
    b.set_defaults(func=run_build)

    e = sub.add_parser(
        "extract-patches", help="patches + crops of one slide into a per-slide store (merge them with merge-patches)",
        description=("The per-slide half of build-dataset, for clusters: heterogeneous patches and visual crops of one "
                     "slide, split unassigned. " + _UNITS))
    e.add_argument("map", type=Path, help="the slide's map store (.zarr)")
    e.add_argument("slide", type=Path, help="the whole-slide image file")
    e.add_argument("--out", type=Path, required=True, help="output per-slide store (.zarr)")
    e.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide"], help="reader backend (default: auto)")
    e.add_argument("--slide-mpp", type=float, default=None, help="level-0 µm/px of the slide, overriding its metadata")
    e.add_argument("--slide-id", default=None, help="slide identifier for a failed slide's store (default: the map's slide_id)")
    e.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="unreadable slide or map: fail (exit 2) or skip (write an empty store marked failed, exit 0; "
                        "merge-patches lists it under failed_slides)")
    _config_args(e)
    e.set_defaults(func=run_extract)

    m = sub.add_parser(
        "merge-patches", help="merge per-slide patch stores into the dataset store, splitting by slide",
        description=("Merge per-slide stores from extract-patches into one dataset store; slides are assigned to "
                     "train/val/test from patches.split and patches.seed (the same split build-dataset gives)."))
    m.add_argument("stores", type=Path, nargs="*", default=[], help="per-slide stores (.zarr)")
    _list_arg(m, "per-slide store")
    m.add_argument("--out", type=Path, required=True, help="output dataset store (.zarr)")
    _config_args(m)
    m.set_defaults(func=run_merge)

    c = sub.add_parser(
        "crop-bank", help="bank of real crops per tissue type from a dataset store",
        description=("Up to patches.crop_bank.per_type valid crops per tissue type from the dataset's "
                     "patches.crop_bank.splits, resized to patches.crop_bank.size px, for synthesis time."))
    c.add_argument("dataset", type=Path, help="dataset store (patches.zarr)")
    c.add_argument("--out", type=Path, required=True, help="output crop bank (.zarr)")
    _config_args(c)
    c.set_defaults(func=run_crop_bank)

    i = sub.add_parser("dataset-info", help="patch counts per split, slide and tissue type of a dataset store",
                       description="Summarise a dataset store: patches and slides per split, patches and valid crops per label.")
    i.add_argument("dataset", type=Path, help="dataset store (patches.zarr)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--out", type=Path, default=None, help="also write the JSON summary to this file")
    i.set_defaults(func=run_info)


def _patch_config(args: argparse.Namespace) -> PatchConfig:
    cfg = load_config(args.config, json_overrides(args.config_json))
    try:
        return section(cfg, "patches", PatchConfig)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"patches: {err}") from None


def _paths(given: list[Path], listing: Path | None, what: str) -> list[Path]:
    paths = list(given)
    if listing is not None:
        if not listing.is_file():
            raise ConfigError(f"{listing}: list of {what}s not found")
        paths += [Path(line.strip()) for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not paths:
        raise ConfigError(f"no {what}s given (positional paths or --list)")
    return paths


def run_build(args: argparse.Namespace) -> int:
    from histopipe.dataset import build_dataset, jobs_from_maps
    from histopipe.sheet import read_sheet

    cfg = _patch_config(args)
    jobs = jobs_from_maps(_paths(args.maps, args.list, "map store"), read_sheet(args.sheet), args.backend)
    r = build_dataset(jobs, args.out, cfg)
    print(f"{r['n_patches']} patches from {len(jobs)} slides ({_split_counts(r['splits'])}) -> {args.out}")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from histopipe.dataset import SlideJob, extract_slide, write_failed_slide
    from histopipe.maps_io import read_map_store

    cfg = _patch_config(args)
    try:
        r = extract_slide(SlideJob(args.map, args.slide, args.backend, args.slide_mpp), args.out, cfg)
    except HistopipeError as err:
        if args.on_error != "skip" or isinstance(err, ConfigError):
            raise
        slide_id = args.slide_id
        if slide_id is None:
            try:
                slide_id = read_map_store(args.map).slide_id
            except HistopipeError:
                slide_id = args.slide.stem
        log.warning("skipping slide %s: %s", slide_id, err)
        write_failed_slide(args.out, slide_id, cfg, str(err))
        print(f"{slide_id}: FAILED, skipped ({err}) -> {args.out}")
        return 0
    c = r["counts"]
    print(f"{args.slide.name}: {c['kept']} patches ({c['candidates']} windows, {c['tissue']} with tissue, "
          f"{c['heterogeneous']} heterogeneous) -> {args.out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from histopipe.dataset import merge_stores

    cfg = _patch_config(args)
    stores = _paths(args.stores, args.list, "per-slide store")
    r = merge_stores(stores, args.out, cfg)
    print(f"{r['n_patches']} patches from {len(stores)} slides ({_split_counts(r['splits'])}) -> {args.out}")
    return 0


def run_crop_bank(args: argparse.Namespace) -> int:
    from histopipe.cropbank import build_crop_bank

    cfg = _patch_config(args)
    r = build_crop_bank(args.dataset, args.out, cfg.crop_bank, cfg.seed)
    print(f"{r['n_crops']} crops of {len(r['counts'])} tissue types -> {args.out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from histopipe.atomic import atomic_write_text
    from histopipe.dataset import dataset_info

    info = dataset_info(args.dataset)
    text = json.dumps(info, indent=2)
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
    if args.json:
        print(text)
        return 0
    print(f"{info['path']}: {info['n_patches']} patches of {info['patch_size']} px at {info['mpp']:g} µm/px "
          f"({info['source']} maps, {info['num_labels']} labels)")
    for name, s in info["splits"].items():
        print(f"  {name:5s} {s['patches']:7d} patches  {len(s['slides']):5d} slides")
    print(f"  {'label':>5s} {'name':20s} {'patches':>8s} {'crops':>8s}")
    for value, row in info["labels"].items():
        print(f"  {value:>5} {row['name'][:20]:20s} {row['patches']:8d} {row['valid_crops']:8d}")
    return 0


def _split_counts(splits: dict[str, str]) -> str:
    vals = list(splits.values())
    return ", ".join(f"{s} {vals.count(s)}" for s in ("train", "val", "test"))
