"""``histopipe info`` and ``histopipe tile``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from histopipe.config import json_overrides, load_config, section
from histopipe.errors import ConfigError, SlideError
from histopipe.slides import open_slide
from histopipe.tiling import TilingConfig, tile_slide, write_failed_store
from histopipe.tissue import TissueConfig

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a slide's properties as JSON",
                       description="Print backend, vendor, level-0 width/height (px), level downsamples and level-0 µm/px of a slide as JSON.")
    p.add_argument("slide", type=Path, help="whole-slide image file")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide"], help="reader backend (default: auto)")
    p.add_argument("--mpp", type=float, default=None, help="override the level-0 resolution (µm/px)")
    p.set_defaults(func=run_info)

    t = sub.add_parser(
        "tile", help="detect tissue and write the tile store of one slide",
        description=(
            "Detect tissue on a low-resolution view, lay a grid of TILE_SIZE px tiles at MPP µm/px "
            "and write the tile store (zarr v3: level-0 coordinates, tissue fraction per tile, "
            "attributes). The pyramid level to read and the resize factor are derived."),
    )
    t.add_argument("slide", type=Path, help="whole-slide image file")
    t.add_argument("out", type=Path, help="output tile store (.zarr folder)")
    t.add_argument("--config", type=Path, default=None, help="config YAML for the tissue and tiling sections (flags override it)")
    t.add_argument("--config-json", default=None, help="config sections as JSON, merged over --config (used by the workflow)")
    t.add_argument("--mpp", type=float, default=None, help="target resolution of the tiles in µm/px (default 0.5)")
    t.add_argument("--tile-size", type=int, default=None, help="tile side in px at the target resolution (default 256)")
    t.add_argument("--overlap", type=int, default=None, help="overlap of neighbouring tiles in px at the target resolution (default 0)")
    t.add_argument("--min-tissue", type=float, default=None, help="minimum tissue fraction (0-1) of a kept tile (default 0.25)")
    t.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide"], help="reader backend (default: auto)")
    t.add_argument("--slide-mpp", type=float, default=None, help="level-0 µm/px of the slide, overriding its metadata")
    t.add_argument("--slide-id", default=None, help="slide identifier (default: file name without extension)")
    t.add_argument("--qc-dir", type=Path, default=None, help="folder for the tissue overlay PNG, grid PNG and tissue GeoJSON")
    t.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="unreadable slide: fail (exit 2) or skip (write an empty store marked failed, exit 0)")
    t.set_defaults(func=run_tile)


def run_info(args: argparse.Namespace) -> int:
    with open_slide(args.slide, args.backend, args.mpp) as s:
        print(json.dumps(s.info(), indent=2))
    return 0


def _configs(args: argparse.Namespace) -> tuple[TilingConfig, TissueConfig]:
    cfg = load_config(args.config, json_overrides(args.config_json))
    try:
        tiling = section(cfg, "tiling", TilingConfig)
        flags = {"mpp": args.mpp, "tile_size": args.tile_size, "overlap": args.overlap, "min_tissue": args.min_tissue}
        tiling = replace(tiling, **{k: v for k, v in flags.items() if v is not None})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"tiling: {err}") from None
    if tiling.tile_size < 16 or tiling.mpp <= 0 or not 0 <= tiling.min_tissue <= 1:
        raise ConfigError(f"tiling: invalid values {tiling}")
    return tiling, section(cfg, "tissue", TissueConfig)


def run_tile(args: argparse.Namespace) -> int:
    tiling, tissue = _configs(args)
    slide_id = args.slide_id or args.slide.stem
    try:
        r = tile_slide(args.slide, args.out, slide_id, tiling, tissue, args.backend, args.slide_mpp, args.qc_dir)
    except SlideError as err:
        if args.on_error != "skip":
            raise
        log.warning("skipping slide %s: %s", slide_id, err)
        write_failed_store(args.out, slide_id, args.slide, tiling, str(err))
        if args.qc_dir is not None:
            from histopipe.atomic import atomic_write_text

            atomic_write_text(Path(args.qc_dir) / f"{slide_id}.error.txt", str(err) + "\n")
        print(f"{slide_id}: FAILED, skipped ({err.problem}) -> {args.out}")
        return 0
    p = r.plan
    print(f"{slide_id}: {r.n_tiles}/{r.n_grid} tiles of {tiling.tile_size} px at {tiling.mpp:g} µm/px "
          f"(level {p.read_level}, read {p.read_size} px), {r.status}, {r.seconds:.2f} s -> {args.out}")
    return 0
