# histopipe: whole-slide images -> annotated synthetic histopathology.
# Run: snakemake --profile profiles/local   (or --profile slurm on a cluster, after `histopipe install-profile`)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/tiles.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/nuclei.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
