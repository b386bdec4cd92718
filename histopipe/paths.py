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


def encoder_id(name: str) -> str:
    """Path-safe name of an encoder: ``timm:resnet50`` → ``timm-resnet50``."""
    return name.replace(":", "-").replace("/", "-")


SLIDE_ID_REGEX = r"[A-Za-z0-9][A-Za-z0-9._-]*"

# Per-slide tiling outputs: the store, and a QC folder with {slide}.tissue.png (mask
# overlay), {slide}.grid.png (kept tiles) and {slide}.tissue.geojson (QuPath annotations).
TILES = "{results}/tiles/{tiling}/{slide}.zarr"
TILE_QC = "{results}/tiles/{tiling}/qc/{slide}"
TILING_SUMMARY = "{results}/qc/tiling_{tiling}.tsv"

# Per-slide embeddings of the tiles (features (N, D), coords (N, 2)); {encoder} is the
# registry name through encoder_id(), e.g. efficientnet_lite0, uni or timm-resnet50.
EMBEDDINGS = "{results}/embeddings/{encoder}/{tiling}/{slide}.zarr"

# Quality control and logs.
FAILED_SLIDES = "{results}/qc/failed_slides.tsv"
LOG = "{results}/logs/{rule}/{name}.log"
BENCHMARK = "{results}/benchmarks/{rule}/{name}.tsv"


def fill(template: str, **values: object) -> Path:
    return Path(template.format(**values))
