"""``histopipe plot-training`` and ``histopipe plot-flags`` (figures of the report)."""

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


def run_training(args: argparse.Namespace) -> int:
    from histopipe.report import training_curves_png

    training_curves_png(args.work, args.out, args.title)
    return 0


def run_flags(args: argparse.Namespace) -> int:
    from histopipe.report import flag_examples_png

    s = flag_examples_png(args.flags, args.synthetic, args.out, args.n)
    print(f"{s['flagged']} of {s['n']} flagged -> {args.out}")
    return 0
