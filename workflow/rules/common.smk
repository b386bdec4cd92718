# Parse-time validation of the config and the cohort sheet; input functions.
import json
import shlex
from pathlib import Path

from snakemake.utils import validate

from histopipe import paths
from histopipe.errors import HistopipeError
from histopipe.nuclei.sheet import read_nuclei_sheet
from histopipe.sheet import read_sheet
from histopipe.workflow import Cohort, check_gpus, job_gpus


validate(config, "../schemas/config.schema.yaml")


def profile_gpus():
    """The profile's (or --resources) `gpu`: the GPUs of one node; None when not set."""
    value = workflow.global_resources.get("gpu")
    value = getattr(value, "value", value)  # Snakemake 9 wraps resource values
    return value if isinstance(value, int) else None


try:
    COHORT = Cohort(read_sheet(config["sheet"]), config)
    NUCLEI_SOURCES = read_nuclei_sheet(config["nuclei"]["sheet"]) if config["nuclei"]["enabled"] else []
    check_gpus(config, profile_gpus())
    COHORT.check_reuse()  # ldm.models: the reused pipelines fit this cohort's labels
except HistopipeError as err:
    raise WorkflowError(str(err)) from None

R = config["results"]
TILING = COHORT.tiling_id
ENCODER = COHORT.encoder
K = COHORT.k
DATASET = COHORT.dataset_id
TWO_LEVEL = config["clustering"]["method"] == "two_level"


wildcard_constraints:
    slide=paths.SLIDE_ID_REGEX,
    batch=paths.BATCH_REGEX,
    variant=r"unconditional|map|map_crop_embeddings|map_crops|real",
    mode=r"real|synthetic|both",
    metric=r"[a-z_]+",
    model=r"vae|ldm_(unconditional|map|map_crop_embeddings|map_crops)",
    tiling=r"mpp[0-9.]+_px[0-9]+(_ov[0-9]+)?",
    encoder=r"[A-Za-z0-9._-]+",


def get_final_output():
    return COHORT.final_outputs()


def slide_path(wildcards):
    return str(COHORT.slide(wildcards.slide).path)


def slide_options(wildcards):
    return COHORT.tile_options(wildcards.slide)


def batch_inputs(template, **values):
    """Input function: ``template`` filled for each slide of the job's batch."""
    return lambda wildcards: COHORT.batch_members(template, wildcards.batch, **values)


def batch_slides(wildcards):
    return [str(COHORT.slide(s).path) for s in COHORT.batches[wildcards.batch]]


def batch_annotations(wildcards):
    return [str(COHORT.slide(s).annotation) for s in COHORT.batches[wildcards.batch]]


def batch_commands(stage, output_name, config_json="{}"):
    """Params function: the per-slide histopipe commands of the job's batch."""
    return lambda wildcards, output: COHORT.batch_commands(
        stage, wildcards.batch, output[output_name], config_json, config["on_error"]
    )


def gpus(key):
    """GPUs of a multi-GPU job (config ``<key>.gpus``); its CPUs and memory scale with them."""
    return job_gpus(config, key)


def config_json(*sections):
    return json.dumps({s: config[s] for s in sections})


# The settings of the `evaluation` section that DeepLabv3+ training reads. Its jobs get only
# these, so that a new metric setting does not retrain the real-arm segmenter (an input of
# every LDM's progress evaluations) and, after it, every model.
SEGMENTATION_SETTINGS = ("segmentation", "device", "seed")


def evaluation_json(keys):
    """Only ``keys`` of the evaluation section, as JSON."""
    return json.dumps({"evaluation": {k: config["evaluation"][k] for k in keys}})


def join_name(*parts):
    """Log and benchmark names nest like the outputs they belong to."""
    return "/".join(parts)


def nuclei_config(wildcards):
    # A function, not a string: the prompt template's {tissue} is not a wildcard.
    return config_json("nuclei")


def nuclei_train_inputs():
    """The nuclei store, and the workflow's VAE when the nuclei model works in its latent
    space without a pretrained one."""
    inputs = {"store": paths.NUCLEI_DATASET.format(results=R)}
    model = config["nuclei"]["model"]
    if model["space"] == "latent" and not model["vae_pretrained"]:
        inputs["vae"] = COHORT.vae_model()
    return inputs


def ldm_config_json(wildcards):
    """The ldm section with the variant of this job (one model per ablation variant)."""
    return json.dumps({"ldm": {**config["ldm"], "variant": wildcards.variant}})




def distribution_inputs(wildcards):
    """The dataset and the held-out synthetic store of a variant; the real reference row has
    no synthetic store (its real patches stand in)."""
    inputs = {"dataset": COHORT.dataset()}
    if wildcards.variant != "real":
        inputs["synthetic"] = COHORT.synthetic(wildcards.variant)
    return inputs


def fidelity_inputs(wildcards):
    """The distribution inputs, and the judges of label and crop fidelity."""
    return {**distribution_inputs(wildcards), "segmenter": COHORT.segmenter(), "crop_bank": COHORT.crop_bank()}


def distribution_source(wildcards, input):
    """The real reference row: real patches of other slides (val, else train) in the synthetic's place."""
    if wildcards.variant == "real":
        return f"--synthetic {shlex.quote(input.dataset)} --synthetic-split val,train"
    return f"--synthetic {shlex.quote(input.synthetic)}"


def fidelity_source(wildcards, input):
    return "--reference" if wildcards.variant == "real" else f"--synthetic {shlex.quote(input.synthetic)}"


def training_model(wildcards):
    """The trained model folder behind a training-curve figure."""
    if wildcards.model == "vae":
        return paths.VAE_MODEL.format(results=R, dataset=DATASET)
    return paths.LDM_MODEL.format(results=R, dataset=DATASET, variant=wildcards.model[len("ldm_"):])
