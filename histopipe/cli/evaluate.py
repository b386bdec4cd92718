"""``histopipe evaluate-distribution | evaluate-segmentation | evaluate-fidelity |
ablation-table | figures``.

Settings come from the ``evaluation`` section of the config (``--config``; schema defaults
without it); the few flags here name inputs and outputs or override what a rule varies.
Heavy imports (torch, models) happen inside the commands so that ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histopipe.config import add_config_args


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_config(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-distribution",
        help="Fréchet distance and precision/recall/density/coverage of synthetic vs real patches",
        description=(
            "Embed held-out real patches and synthetic images with each encoder of the registry "
            "and write, per encoder, the Fréchet distance (float64 statistics of up to "
            "evaluation.max_samples images per set) and k-NN precision, recall, density and "
            "coverage (evaluation.manifold_samples images, k = evaluation.knn_k). The JSON "
            "records sample counts, encoders, weights and seeds."
        ),
    )
    p.add_argument("--real", required=True, metavar="PATCHES.zarr", help="training-patch store")
    p.add_argument("--real-split", choices=("train", "val", "test", "all"),
                   help="split of --real used as reference (default: evaluation.real_split)")
    p.add_argument("--synthetic", required=True, metavar="SYN.zarr",
                   help="synthetic store (`images` uint8 (N,S,S,3)); a patch store also works")
    p.add_argument("--synthetic-split", default="all",
                   help="split of --synthetic when it is a patch store (default: all rows); a list "
                        "such as val,train takes the first that has patches (the real reference row)")
    p.add_argument("--encoders", type=_csv, metavar="A,B",
                   help="comma-separated registry names (default: evaluation.encoders)")
    p.add_argument("--variant", help="row name in the ablation table (default: store attrs)")
    p.add_argument("--seed", type=int, help="overrides evaluation.seed")
    p.add_argument("--out", required=True, metavar="JSON", help="metrics JSON to write")
    p.add_argument("--tsv", metavar="TSV", help="also write one row per encoder as TSV")
    _add_config(p)
    p.set_defaults(func=run_distribution)

    p = sub.add_parser(
        "evaluate-segmentation",
        help="DeepLabv3+ trained on real, synthetic or both; scored on the real test split",
        description=(
            "Train DeepLabv3+ (evaluation.segmentation: encoder, steps, batch size, lr, image "
            "size in px) on the real train split (--mode real), the synthetic store (synthetic) "
            "or both pooled (both), then score it on the real test split (split by slide): "
            "per-class IoU and Dice, mIoU, mDice, pixel accuracy, confusion matrix."
        ),
    )
    p.add_argument("--train-real", required=True, metavar="PATCHES.zarr",
                   help="training-patch store: train split for training, test split for testing")
    p.add_argument("--train-synthetic", metavar="SYN.zarr", help="synthetic store (`images`, `maps`)")
    p.add_argument("--mode", required=True, choices=("real", "synthetic", "both"))
    p.add_argument("--variant", help="row name in the ablation table (default: store attrs, or `real`)")
    p.add_argument("--seed", type=int, help="overrides evaluation.seed")
    p.add_argument("--out", required=True, metavar="JSON", help="scores JSON to write")
    p.add_argument("--model-out", metavar="PT",
                   help="also save the trained segmenter (the real arm scores label fidelity)")
    _add_config(p)
    p.set_defaults(func=run_segmentation)

    p = sub.add_parser(
        "evaluate-fidelity",
        help="label fidelity (does an image follow its map?) and crop fidelity (does it use its crops?)",
        description=(
            "Label fidelity: the real-arm segmenter (evaluate-segmentation --mode real --model-out) "
            "on every synthetic image, scored against the map it was generated from (mIoU, mDice, "
            "pixel accuracy). Crop fidelity: cosine similarity in evaluation.fidelity_encoder between "
            "each conditioning crop and a square of its synthesised region, over the same for a "
            "random crop of the tissue type from another slide (crop bank); also with the crop's "
            "own box cut out of the region."
        ),
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--synthetic", metavar="SYN.zarr", help="synthetic store (histopipe synthesize)")
    g.add_argument("--reference", action="store_true",
                   help="score the real evaluation.real_split patches with their own crops instead (row `real`)")
    p.add_argument("--real", required=True, metavar="PATCHES.zarr", help="the training-patch store (label levels)")
    p.add_argument("--segmenter", required=True, metavar="PT", help="real-arm segmenter file")
    p.add_argument("--crop-bank", required=True, metavar="BANK.zarr", help="crop bank of the patch store")
    p.add_argument("--variant", help="row name in the ablation table (default: store attrs)")
    p.add_argument("--out", required=True, metavar="JSON", help="scores JSON to write")
    _add_config(p)
    p.set_defaults(func=run_fidelity)

    p = sub.add_parser(
        "ablation-table",
        help="gather per-variant metric JSONs into one table (TSV, Markdown, HTML, PNG)",
        description=(
            "One row per variant; columns FD, precision, recall, density, coverage per encoder "
            "and downstream mIoU/mDice (synthetic only; `_both` = real + synthetic). Rows follow "
            "evaluation.variants, `real` last."
        ),
    )
    p.add_argument("--inputs", required=True, nargs="+", metavar="JSON",
                   help="outputs of evaluate-distribution, evaluate-fidelity and evaluate-segmentation")
    p.add_argument("--out", required=True, action="append", metavar="FILE",
                   help="table to write; format from the suffix (.tsv .md .html .png); repeatable")
    _add_config(p)
    p.set_defaults(func=run_ablation)

    p = sub.add_parser("figures", help="evaluation figures (PNG)")
    fig = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    g = fig.add_parser(
        "grid",
        help="real-vs-synthetic grid with the tissue maps",
        description=(
            "Rows of [real map | real patch | synthetic map | synthetic image] for "
            "evaluation.grid_samples random synthetic samples, maps in the fixed tissue palette."
        ),
    )
    g.add_argument("--real", required=True, metavar="PATCHES.zarr")
    g.add_argument("--real-split", choices=("train", "val", "test", "all"),
                   help="split of --real to draw from (default: evaluation.real_split)")
    g.add_argument("--synthetic", required=True, metavar="SYN.zarr")
    g.add_argument("--n", type=int, help="rows (default: evaluation.grid_samples)")
    g.add_argument("--out", required=True, metavar="PNG")
    _add_config(g)
    g.set_defaults(func=run_grid)
    v = fig.add_parser(
        "variants",
        help="the variants side by side on the same held-out maps",
        description="Rows of [real patch | its map | the crops given | one sample per synthetic store] for held-out maps common to all stores.",
    )
    v.add_argument("--real", required=True, metavar="PATCHES.zarr")
    v.add_argument("--synthetic", required=True, nargs="+", metavar="SYN.zarr", help="held-out synthetic stores, one per variant")
    v.add_argument("--n", type=int, help="rows (default: evaluation.grid_samples)")
    v.add_argument("--out", required=True, metavar="PNG")
    _add_config(v)
    v.set_defaults(func=run_variants)
    m = fig.add_parser(
        "metrics",
        help="bar panels of one metric from an ablation table",
        description="One panel per encoder (for fd, precision, ...) with one bar per variant.",
    )
    m.add_argument("--table", required=True, metavar="TSV", help="ablation-table TSV")
    m.add_argument("--metric", required=True,
                   help="fd, precision, recall, density, coverage, miou, mdice, miou_both, ...")
    m.add_argument("--out", required=True, metavar="PNG")
    m.set_defaults(func=run_metric_figure)


def run_distribution(args: argparse.Namespace) -> int:
    from histopipe.errors import HistopipeError
    from histopipe.evaluation.distribution import (
        TSV_COLUMNS,
        distribution_rows,
        evaluate_distribution,
    )
    from histopipe.evaluation.features import SPLITS, ImageSet
    from histopipe.evaluation.outputs import write_json, write_tsv
    from histopipe.evaluation.settings import load_settings

    settings = load_settings(args.config, args.config_json).with_overrides(encoders=args.encoders, seed=args.seed)
    real = ImageSet.open(args.real, args.real_split or settings.real_split,
                         settings.max_samples, settings.seed)
    splits = [x.strip() for x in args.synthetic_split.split(",") if x.strip()]
    bad = [x for x in splits if x != "all" and x not in SPLITS]
    if bad or not splits:
        raise HistopipeError(f"--synthetic-split {args.synthetic_split!r}: splits are train, val, test or all")
    synthetic = None
    for i, split in enumerate(splits):
        try:
            synthetic = ImageSet.open(args.synthetic, split, settings.max_samples, settings.seed + 1)
            break
        except HistopipeError:
            if i == len(splits) - 1:
                raise
    result = evaluate_distribution(real, synthetic, settings, variant=args.variant)
    write_json(args.out, result)
    if args.tsv:
        write_tsv(args.tsv, distribution_rows(result), TSV_COLUMNS)
    return 0


def run_segmentation(args: argparse.Namespace) -> int:
    from histopipe.evaluation.outputs import write_json
    from histopipe.evaluation.segmentation import evaluate_segmentation
    from histopipe.evaluation.settings import load_settings

    settings = load_settings(args.config, args.config_json).with_overrides(seed=args.seed)
    result = evaluate_segmentation(args.mode, args.train_real, args.train_synthetic, settings,
                                   variant=args.variant, model_out=args.model_out)
    write_json(args.out, result)
    return 0


def run_fidelity(args: argparse.Namespace) -> int:
    from histopipe.evaluation.fidelity import evaluate_fidelity
    from histopipe.evaluation.outputs import write_json
    from histopipe.evaluation.settings import load_settings

    settings = load_settings(args.config, args.config_json)
    result = evaluate_fidelity(None if args.reference else args.synthetic, args.real, args.segmenter, args.crop_bank,
                               settings, variant=args.variant)
    write_json(args.out, result)
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    from histopipe.evaluation.ablation import assemble, load_results, write_table
    from histopipe.evaluation.settings import load_settings

    order = load_settings(args.config, args.config_json).variants
    write_table(assemble(load_results(args.inputs), order), args.out)
    return 0


def run_grid(args: argparse.Namespace) -> int:
    from histopipe.evaluation.features import ImageSet
    from histopipe.evaluation.figures import grid_from_stores, save_png
    from histopipe.evaluation.settings import load_settings

    settings = load_settings(args.config, args.config_json)
    real = ImageSet.open(args.real, args.real_split or settings.real_split)
    synthetic = ImageSet.open(args.synthetic)
    n = args.n or settings.grid_samples
    save_png(grid_from_stores(real, synthetic, n, settings.seed), Path(args.out))
    return 0


def run_variants(args: argparse.Namespace) -> int:
    from histopipe.evaluation.features import ImageSet
    from histopipe.evaluation.figures import save_png, variants_grid
    from histopipe.evaluation.settings import load_settings

    settings = load_settings(args.config, args.config_json)
    synthetic = [ImageSet.open(p) for p in args.synthetic]
    grid = variants_grid(ImageSet.open(args.real, "all"), synthetic, args.n or settings.grid_samples, settings.seed)
    save_png(grid, Path(args.out))
    return 0


def run_metric_figure(args: argparse.Namespace) -> int:
    from histopipe.evaluation.ablation import read_tsv_table
    from histopipe.evaluation.figures import metric_panels

    metric_panels(read_tsv_table(args.table), args.metric, args.out)
    return 0
