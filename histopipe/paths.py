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

# Generative models (work folders: model/ is the trained model, checkpoints/ logs/ samples/
# beside it) and synthetic data. {variant} is config ldm.variant; {mode} a synthesize --mode.
VAE_WORK = "{results}/models/{dataset}/vae"
VAE_MODEL = "{results}/models/{dataset}/vae/model"
LDM_WORK = "{results}/models/{dataset}/ldm_{variant}"
LDM_MODEL = "{results}/models/{dataset}/ldm_{variant}/model"
SYNTHETIC = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}"
SYNTHETIC_STORE = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}/synthetic.zarr"
SYNTHETIC_MANIFEST = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}/manifest.csv"
HALLUCINATION_FLAGS = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}/flags.csv"

# Quality control and logs.
FAILED_SLIDES = "{results}/qc/failed_slides.tsv"
SLIDE_STATUS = "{results}/qc/status/{slide}.json"
LOG = "{results}/logs/{rule}/{name}.log"
BENCHMARK = "{results}/benchmarks/{rule}/{name}.tsv"


def fill(template: str, **values: object) -> Path:
    return Path(template.format(**values))
