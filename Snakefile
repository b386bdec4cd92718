# histopipe: whole-slide images -> annotated synthetic histopathology.
# Run: snakemake --profile profiles/local   (or profiles/slurm on a cluster)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tiles.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
