"""Every output path of the workflow, spelled once.

Templates use Snakemake-style ``{wildcards}``; the rules and the package format them with
the same names. Parameters that change an output live in its path (``tiling`` is e.g.
``mpp0.5_px256``), so outputs of different settings never collide.
"""

from __future__ import annotations

from pathlib import Path


def _fmt(value: float) -> str:
    return f"{value:g}"


def tiling_id(mpp: float, tile_size: int, overlap: int = 0) -> str:
    """Name of a tiling setting, e.g. ``mpp0.5_px256`` or ``mpp0.5_px256_ov32``."""
    tid = f"mpp{_fmt(mpp)}_px{int(tile_size)}"
    if overlap:
        tid += f"_ov{int(overlap)}"
    return tid


# Per-slide tiling outputs.
TILES = "{results}/tiles/{tiling}/{slide}.zarr"
TISSUE_GEOJSON = "{results}/tiles/{tiling}/{slide}.tissue.geojson"
TISSUE_PNG = "{results}/tiles/{tiling}/{slide}.tissue.png"
GRID_PNG = "{results}/tiles/{tiling}/{slide}.grid.png"

# Evaluation of one dataset's synthetic variants (`variant` as in config evaluation.variants;
# `mode` is real | synthetic | both, the data DeepLabv3+ is trained on; the `real` baseline
# is variant "real" in mode "real").
EVAL_DISTRIBUTION = "{results}/evaluation/{dataset}/distribution/{variant}.json"
EVAL_DISTRIBUTION_TSV = "{results}/evaluation/{dataset}/distribution/{variant}.tsv"
EVAL_SEGMENTATION = "{results}/evaluation/{dataset}/segmentation/{mode}/{variant}.json"
EVAL_GRID_PNG = "{results}/evaluation/{dataset}/figures/{variant}.grid.png"
ABLATION_TABLE = "{results}/evaluation/{dataset}/ablation.{ext}"
ABLATION_FIGURE = "{results}/evaluation/{dataset}/figures/ablation_{metric}.png"

# Quality control and logs.
FAILED_SLIDES = "{results}/qc/failed_slides.tsv"
SLIDE_STATUS = "{results}/qc/status/{slide}.json"
LOG = "{results}/logs/{rule}/{name}.log"
BENCHMARK = "{results}/benchmarks/{rule}/{name}.tsv"


def fill(template: str, **values: object) -> Path:
    return Path(template.format(**values))
