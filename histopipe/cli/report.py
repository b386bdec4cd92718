"""``histopipe plot-training``, ``histopipe plot-flags`` (figures of the report) and
``histopipe slide-table`` (the per-slide table and the report's selection of slide images)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("plot-training", help="training curves (PNG): loss and progress metrics of a model",
                       description="Plot the training loss against the optimiser step from the TensorBoard event files under WORK (a train-vae / train-ldm output folder), beside the progress evaluations of WORK/progress.jsonl (FD and label fidelity of samples, or reconstruction PSNR).")
    t.add_argument("work", type=Path, help="training output folder (holds logs/)")
    t.add_argument("--out", type=Path, required=True, help="output PNG")
    t.add_argument("--title", default=None, help="figure title")
    t.set_defaults(func=run_training)
    f = sub.add_parser("plot-flags", help="hallucination flags: count and the most distant synthetic images (PNG)",
                       description="Show how many synthetic images were flagged as far from every real tile, with the highest-scoring images.")
    f.add_argument("flags", type=Path, help="flags CSV (flag-hallucinations)")
    f.add_argument("--synthetic", type=Path, required=True, help="synthetic.zarr the flags refer to")
    f.add_argument("--out", type=Path, required=True, help="output PNG")
    f.add_argument("--n", type=int, default=8, help="images shown (default 8)")
    f.set_defaults(func=run_flags)
    st = sub.add_parser("slide-table", help="per-slide table (TSV + searchable HTML) and a bounded selection of slide images for the report",
                        description="One row per slide: status, tiles, tissue area (mm²), QC flags (tile count or tissue area far from the cohort's), failure reason, tissue-type histogram and the path of its map PNG. Copies the map PNGs of at most --max-slides slides, downscaled, into --images: one per failure kind and outlier flag, then enough to show every tissue type, then slides spread over the sheet.")
    st.add_argument("--list", type=Path, required=True, help="TSV file with 'tiles.zarr<TAB>map.zarr<TAB>tiling QC folder' per slide, sheet order")
    st.add_argument("--tsv", type=Path, required=True, help="output table (TSV, every slide)")
    st.add_argument("--html", type=Path, required=True, help="output table (HTML with a search box)")
    st.add_argument("--images", type=Path, required=True, help="output folder: <slide>.png of the chosen slides")
    st.add_argument("--max-slides", type=int, default=50, help="most slide images (default 50)")
    st.add_argument("--image-px", type=int, default=800, help="longest side of each image, px (default 800)")
    st.set_defaults(func=run_slide_table)


def run_training(args: argparse.Namespace) -> int:
    from histopipe.report import training_curves_png

    training_curves_png(args.work, args.out, args.title)
    return 0


def run_flags(args: argparse.Namespace) -> int:
    from histopipe.report import flag_examples_png

    s = flag_examples_png(args.flags, args.synthetic, args.out, args.n)
    print(f"{s['flagged']} of {s['n']} flagged -> {args.out}")
    return 0


def run_slide_table(args: argparse.Namespace) -> int:
    from histopipe.cli.cluster import _read_list
    from histopipe.slide_table import (
        flag_outliers,
        read_rows,
        select_slides,
        write_html,
        write_selected_images,
        write_tsv,
    )

    listed = _read_list(args.list, 3)
    rows = read_rows(*([str(r[i]) for r in listed] for i in range(3)))
    flag_outliers(rows)
    chosen = select_slides(rows, args.max_slides)
    write_tsv(rows, chosen, args.tsv)
    write_html(rows, chosen, args.html)
    n = write_selected_images(rows, chosen, args.images, args.image_px)
    print(f"{len(rows)} slides in {args.tsv}; {n} images of {len(chosen)} chosen -> {args.images}")
    return 0
