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
BATCH_REGEX = r"[0-9]{5}"

# Per-slide tiling outputs: the store, and a QC folder with {slide}.tissue.png (mask
# overlay), {slide}.grid.png (kept tiles) and {slide}.tissue.geojson (QuPath annotations).
TILES = "{results}/tiles/{tiling}/{slide}.zarr"
TILE_QC = "{results}/tiles/{tiling}/qc/{slide}"
TILING_SUMMARY = "{results}/qc/tiling_{tiling}.tsv"

# Per-slide embeddings of the tiles (features (N, D), coords (N, 2)); {encoder} is the
# registry name through encoder_id(), e.g. efficientnet_lite0, uni or timm-resnet50.
EMBEDDINGS = "{results}/embeddings/{encoder}/{tiling}/{slide}.zarr"

# Tissue types. One cluster model per encoder, tiling and k (or the config's
# clustering.model when a cohort is reprocessed with existing types); maps per slide
# (contract #3) with a PNG overlay and QuPath GeoJSON beside each. Annotated slides get
# their map from the annotation instead (same grid, no encoder or k in the path).
# Per-slide diversity samples (histopipe.slide_samples) do not depend on k: one set serves
# the models of every k.
# After the embeddings, per-slide work runs in batches of slides (config slides_per_batch,
# sheet order): one job writes the outputs of its batch's slides into batch-<NNNNN>/.
CLUSTER_SAMPLE_BATCH = "{results}/clusters/{encoder}/{tiling}/samples/batch-{batch}"
CLUSTER_SAMPLE = CLUSTER_SAMPLE_BATCH + "/{slide}.zarr"
CLUSTER_SUMMARY = "{results}/clusters/{encoder}/{tiling}/summaries/batch-{batch}.zarr"
CLUSTER_DIR = "{results}/clusters/{encoder}/{tiling}/k{k}"
CLUSTER_MODEL = CLUSTER_DIR + "/model"
CLUSTER_MONTAGE = CLUSTER_DIR + "/montage.png"
STUDENT_MODEL = CLUSTER_DIR + "/student"
TISSUE_MAP_BATCH = "{results}/maps/{encoder}/{tiling}/k{k}/batch-{batch}"
TISSUE_MAP = TISSUE_MAP_BATCH + "/{slide}.zarr"
ANNOTATION_MAP_BATCH = "{results}/maps/annotation/{tiling}/batch-{batch}"
ANNOTATION_MAP = ANNOTATION_MAP_BATCH + "/{slide}.zarr"
# Beside each map store: <slide>.png (overlay on the thumbnail) and <slide>.geojson (QuPath).
MAP_PNG_SUFFIX = ".png"
MAP_GEOJSON_SUFFIX = ".geojson"

# Training-patch dataset (contract #4). {dataset} names the map source and the patch
# setting, e.g. "<encoder>_<tiling>_k<k>_" + patches_id(...) or "annotation_" + patches_id(...).
SLIDE_PATCHES_BATCH = "{results}/dataset/{dataset}/slides/batch-{batch}"
SLIDE_PATCHES = SLIDE_PATCHES_BATCH + "/{slide}.zarr"
DATASET = "{results}/dataset/{dataset}/patches.zarr"
DATASET_INFO = "{results}/dataset/{dataset}/info.json"
CROP_BANK = "{results}/dataset/{dataset}/crop_bank.zarr"


def patches_id(mpp: float, patch_size: int, output_size: int | None = None) -> str:
    """Name of a patch setting, e.g. ``mpp0.5_px512`` or ``mpp0.5_px512_out256``."""
    pid = f"mpp{_fmt(mpp)}_px{int(patch_size)}"
    if output_size and int(output_size) != int(patch_size):
        pid += f"_out{int(output_size)}"
    return pid


# Evaluation of one dataset's synthetic variants (`variant` as in config evaluation.variants;
# `mode` is real | synthetic | both, the data DeepLabv3+ is trained on; the `real` baseline
# is variant "real" in mode "real").
EVAL_DISTRIBUTION = "{results}/evaluation/{dataset}/distribution/{variant}.json"
EVAL_DISTRIBUTION_TSV = "{results}/evaluation/{dataset}/distribution/{variant}.tsv"
EVAL_SEGMENTATION = "{results}/evaluation/{dataset}/segmentation/{mode}/{variant}.json"
SEGMENTER = "{results}/evaluation/{dataset}/segmentation/real/segmenter.pt"
EVAL_FIDELITY = "{results}/evaluation/{dataset}/fidelity/{variant}.json"
EVAL_GRID_PNG = "{results}/evaluation/{dataset}/figures/{variant}.grid.png"
EVAL_VARIANTS_PNG = "{results}/evaluation/{dataset}/figures/variants.png"
ABLATION_TABLE = "{results}/evaluation/{dataset}/ablation.{ext}"
ABLATION_FIGURE = "{results}/evaluation/{dataset}/figures/ablation_{metric}.png"

# Generative models (work folders: model/ is the trained model, checkpoints/ logs/ samples/
# beside it) and synthetic data. {variant} is config ldm.variant; {mode} a synthesize --mode.
VAE_WORK = "{results}/models/{dataset}/vae"
VAE_MODEL = "{results}/models/{dataset}/vae/model"
LDM_WORK = "{results}/models/{dataset}/ldm_{variant}"
LDM_MODEL = "{results}/models/{dataset}/ldm_{variant}/model"
SYNTHETIC = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}"
SYNTHETIC_STORE = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}/synthetic.zarr"
SYNTHETIC_MANIFEST = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}/manifest.csv"
HALLUCINATION_FLAGS = "{results}/synthetic/{dataset}/ldm_{variant}/{mode}.flags.csv"

# The per-slide table of the cohort (TSV, and HTML for the report) and the report's bounded
# selection of slide images ({maps}: Cohort.map_id(), e.g. <encoder>/<tiling>/k<k>).
SLIDE_TABLE = "{results}/report/{maps}/slides.{ext}"
REPORT_SLIDES = "{results}/report/{maps}/slides"

# Figures made for the report. {model} is "vae" or "ldm_<variant>".
TRAINING_CURVE = "{results}/report/{dataset}/training_{model}.png"
FLAGS_FIGURE = "{results}/report/{dataset}/flags_{variant}.png"

# Nuclei branch (histopipe.nuclei): one store from the nuclei dataset sheet, unlabeled
# nuclei patches of the WSI cohort per batch of slides, the model of nuclei.model.mode
# ({mode}: joint or nudiff), its layout model, synthesis and evaluation.
NUCLEI_DATASET = "{results}/nuclei/dataset.zarr"
NUCLEI_WSI_BATCH = "{results}/nuclei/wsi/{tiling}/batch-{batch}"
NUCLEI_WSI = NUCLEI_WSI_BATCH + "/{slide}.zarr"
NUCLEI_WORK = "{results}/nuclei/models/{mode}"
NUCLEI_MODEL = NUCLEI_WORK + "/model"
NUCLEI_LAYOUT = "{results}/nuclei/layout.json"
NUCLEI_SYNTHETIC = "{results}/nuclei/synthetic/{mode}"
NUCLEI_SYNTHETIC_STORE = NUCLEI_SYNTHETIC + "/nuclei.zarr"
NUCLEI_SYNTHETIC_MANIFEST = NUCLEI_SYNTHETIC + "/manifest.tsv"
NUCLEI_METRICS = "{results}/nuclei/evaluation/{mode}/metrics.{ext}"

# Quality control and logs.
FAILED_SLIDES = "{results}/qc/failed_slides.tsv"
LOG = "{results}/logs/{rule}/{name}.log"
BENCHMARK = "{results}/benchmarks/{rule}/{name}.tsv"


def fill(template: str, **values: object) -> Path:
    return Path(template.format(**values))
