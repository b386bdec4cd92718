# Summarise the tile stores of the cohort: slides that failed (on_error: skip) and tile counts.
import sys

from histopipe.qc import write_tiling_summary

with open(snakemake.log[0], "w") as log:  # noqa: F821
    sys.stderr = log
    write_tiling_summary(snakemake.input.tiles, snakemake.output.failed, snakemake.output.summary)  # noqa: F821
