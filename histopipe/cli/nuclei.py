"""Nuclei branch: ``nuclei-dataset``, ``nuclei-wsi-tiles``, ``train-nuclei``, ``fit-nuclei-layout``,
``synthesize-nuclei``, ``evaluate-nuclei``."""

from __future__ import annotations

import argparse
import json
import os
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
    register_models(sub)


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


def register_models(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-nuclei", help="train the nuclei diffusion model (joint or NuDiff) on a nuclei store",
                       description="Train the model of config nuclei.model on the train split of a nuclei store; checkpoints, "
                                   "TensorBoard logs and sample grids go under --out, the pipeline to --out/model. A rerun "
                                   "resumes from the newest complete checkpoint.")
    t.add_argument("store", type=Path, help="nuclei store (.zarr) from nuclei-dataset")
    t.add_argument("--out", type=Path, required=True, help="training folder (the model is written to OUT/model)")
    t.add_argument("--vae", type=Path, default=None, help="VAE folder for latent space when nuclei.model.vae_pretrained is unset")
    add_config_args(t)
    t.set_defaults(func=run_train)

    lay = sub.add_parser("fit-nuclei-layout", help="fit the layout model (cell-type counts + tissue -> point maps) on a nuclei store",
                         description="Learn per tissue the nucleus counts, positions and class-pair spacings of the store's "
                                     "train split (HistoSmith-style layouts); written as JSON.")
    lay.add_argument("store", type=Path, help="nuclei store (.zarr)")
    lay.add_argument("--out", type=Path, required=True, help="output layout model (.json)")
    add_config_args(lay)
    lay.set_defaults(func=run_layout)

    s = sub.add_parser("synthesize-nuclei", help="synthesize nuclei image + label + distance triplets",
                       description="Held-out point maps of the store's test split (default), or layouts drawn from cell-type "
                                   "counts and a tissue type, e.g. --tissue colon --counts neutrophil=12,epithelial=80. "
                                   "Writes OUT/nuclei.zarr (a nuclei store), PNGs and a manifest; resumable.")
    s.add_argument("model", type=Path, help="nuclei pipeline folder (train-nuclei's OUT/model)")
    s.add_argument("--store", type=Path, required=True, help="nuclei store: test point maps, class and tissue names, layouts")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--tissue", default=None, help="tissue type of the layouts (switches to counts mode)")
    s.add_argument("--counts", default=None, help="cell-type counts, e.g. neutrophil=12,epithelial=80 (switches to counts mode)")
    s.add_argument("--layout", type=Path, default=None, help="layout model JSON (default: fitted on the store's train split)")
    add_config_args(s)
    s.set_defaults(func=run_synthesize)

    e = sub.add_parser("evaluate-nuclei", help="FD and downstream nuclei segmentation: real vs real + synthetic",
                       description="Fréchet distance of synthetic vs real test images in the configured encoders; a U-Net "
                                   "(semantic + distance, watershed instances) trained on real and on real + synthetic, scored "
                                   "on the real test split (Dice, AJI, PQ, per-class F1, accuracy, rare-class gain).")
    e.add_argument("real", type=Path, help="real nuclei store (.zarr)")
    e.add_argument("--synthetic", type=Path, default=None, help="synthetic nuclei store (synthesize-nuclei's OUT/nuclei.zarr)")
    e.add_argument("--out", type=Path, required=True, help="output folder (metrics.tsv, metrics.json, metrics.md)")
    add_config_args(e)
    e.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from histopipe.distributed import relaunch
    from histopipe.nuclei.settings import train_settings
    from histopipe.nuclei.training import train_nuclei

    cfg = config_from_args(args)
    s = train_settings(cfg)
    if (rc := relaunch(s.gpus, args.argv, s.batch_size, "nuclei.train")) is not None:
        return rc
    model = train_nuclei(cfg, args.store, args.out, vae=args.vae)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"nuclei model -> {model}")
    return 0


def run_layout(args: argparse.Namespace) -> int:
    from histopipe.nuclei.layout import fit_layout
    from histopipe.nuclei.settings import layout_settings

    fit_layout(args.store, args.out, layout_settings(config_from_args(args)))
    print(f"layout model -> {args.out}")
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from histopipe.nuclei.synthesis import synthesize_nuclei

    out = synthesize_nuclei(config_from_args(args), args.model, args.store, args.out, counts=args.counts,
                            tissue=args.tissue, layout=args.layout)
    print(f"synthetic nuclei -> {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from histopipe.nuclei.evaluate import evaluate_nuclei

    evaluate_nuclei(config_from_args(args), args.real, args.synthetic, args.out)
    print(f"nuclei evaluation -> {args.out}")
    return 0
