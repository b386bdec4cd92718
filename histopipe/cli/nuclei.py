"""Nuclei branch: ``nuclei-dataset``, ``nuclei-wsi-tiles``, ``train-nuclei``, ``fit-nuclei-layout``,
``synthesize-nuclei``, ``evaluate-nuclei``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from histopipe.config import add_config_args, config_from_args
from histopipe.slides import BACKENDS


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("nuclei-dataset", help="nuclei datasets of a sheet (CoNIC/Lizard, PanNuke, folder) -> one nuclei store",
                       description="Read every dataset listed in a nuclei sheet, derive semantic, distance and point maps, "
                                   "cut patch_size px patches and write one zarr store with a train/test split (config nuclei.data).")
    d.add_argument("sheet", type=Path, help="nuclei dataset sheet (TSV: dataset_id, format, path, split, tissue)")
    d.add_argument("--out", type=Path, required=True, help="output nuclei store (.zarr)")
    add_config_args(d)
    d.set_defaults(func=run_dataset)

    w = sub.add_parser("nuclei-wsi-tiles", help="unlabeled nuclei patches of one slide of the WSI cohort -> image-only store",
                       description="Read up to nuclei.data.wsi_tiles patches at nuclei.data.wsi_mpp µm/px, centred on the tissue "
                                   "tiles of the slide's tile store (unlabeled augmentation source).")
    w.add_argument("slide", type=Path, help="whole-slide image")
    w.add_argument("tiles", type=Path, help="tile store (.zarr) of the slide")
    w.add_argument("--out", type=Path, required=True, help="output image-only nuclei store (.zarr)")
    w.add_argument("--slide-id", default=None, help="slide id (default: the tile store's)")
    w.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="slide reader (default auto)")
    w.add_argument("--slide-mpp", type=float, default=None, help="µm/px of level 0 when the file lacks it")
    w.add_argument("--tissue", default="unknown", help="tissue type recorded for the patches (default unknown)")
    add_config_args(w)
    w.set_defaults(func=run_wsi_tiles)


def _data_settings(args: argparse.Namespace):
    from histopipe.nuclei.store import NucleiDataSettings

    return NucleiDataSettings.from_config(config_from_args(args))


def run_dataset(args: argparse.Namespace) -> int:
    from histopipe.nuclei.sheet import read_nuclei_sheet
    from histopipe.nuclei.store import build_nuclei_store, store_info

    settings = _data_settings(args)
    build_nuclei_store(read_nuclei_sheet(args.sheet), args.out, settings)
    info = store_info(args.out)
    print(json.dumps({k: info[k] for k in ("n_patches", "splits") if k in info}) + f" -> {args.out}")
    return 0


def run_wsi_tiles(args: argparse.Namespace) -> int:
    from histopipe.nuclei.wsi import build_wsi_store

    settings = _data_settings(args)
    build_wsi_store(args.slide, args.tiles, args.out, settings, slide_id=args.slide_id, backend=args.backend,
                    mpp=args.slide_mpp, tissue=args.tissue)
    print(f"{args.slide.name}: nuclei patches at {settings.wsi_mpp} µm/px -> {args.out}")
    return 0
