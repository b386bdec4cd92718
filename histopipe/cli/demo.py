"""``histopipe demo-cohort``."""

from __future__ import annotations

import argparse
from pathlib import Path

from histopipe.demo import build_demo_cohort


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-cohort", help="write the demo cohort (real tissue) and its sheet",
        description=(
            "Write the demo cohort into DIR: the real Aperio slide CMU-1-Small-Region (0.499 µm/px) "
            "and four slides derived from it (a 40x mosaic at 0.2495 µm/px, a generic tiled TIFF, "
            "a SubIFD pyramid read by tiffslide, a slide with background gaps), plus DIR/slides.tsv."),
    )
    p.add_argument("dir", type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="rewrite slides that already exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sheet = build_demo_cohort(args.dir, force=args.force)
    print(f"demo cohort: {sheet}")
    return 0
