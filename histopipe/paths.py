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


SLIDE_ID_REGEX = r"[A-Za-z0-9][A-Za-z0-9._-]*"

# Per-slide tiling outputs: the store, and a QC folder with {slide}.tissue.png (mask
# overlay), {slide}.grid.png (kept tiles) and {slide}.tissue.geojson (QuPath annotations).
TILES = "{results}/tiles/{tiling}/{slide}.zarr"
TILE_QC = "{results}/tiles/{tiling}/qc/{slide}"
TILING_SUMMARY = "{results}/qc/tiling_{tiling}.tsv"

# Quality control and logs.
FAILED_SLIDES = "{results}/qc/failed_slides.tsv"
LOG = "{results}/logs/{rule}/{name}.log"
BENCHMARK = "{results}/benchmarks/{rule}/{name}.tsv"


def fill(template: str, **values: object) -> Path:
    return Path(template.format(**values))
