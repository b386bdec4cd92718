# Parse-time validation of the config and the cohort sheet; input functions.
import json

from snakemake.utils import validate

from histopipe import paths
from histopipe.errors import HistopipeError
from histopipe.sheet import read_sheet
from histopipe.workflow import Cohort


validate(config, "../schemas/config.schema.yaml")
try:
    COHORT = Cohort(read_sheet(config["sheet"]), config)
except HistopipeError as err:
    raise WorkflowError(str(err)) from None

R = config["results"]
TILING = COHORT.tiling_id


wildcard_constraints:
    slide=paths.SLIDE_ID_REGEX,
    tiling=r"mpp[0-9.]+_px[0-9]+(_ov[0-9]+)?",


def get_final_output():
    return COHORT.final_outputs()


def slide_path(wildcards):
    return str(COHORT.slide(wildcards.slide).path)


def tile_options(wildcards):
    return COHORT.tile_options(wildcards.slide)


def config_json(*sections):
    return json.dumps({s: config[s] for s in sections})
