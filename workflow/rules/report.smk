# Figures that exist only for the report (`snakemake --report report.html`).
rule plot_training:
    input:
        model=training_model,
    output:
        png=report(
            paths.TRAINING_CURVE.format(results=R, dataset=DATASET, model="{model}"),
            caption="../report/training.rst",
            category="Training",
        ),
    params:
        work=lambda wildcards, input: str(Path(input.model).parent),
    log:
        paths.LOG.format(results=R, rule="plot_training", name=join_name(DATASET, "{model}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "histopipe plot-training {params.work:q} --title {wildcards.model} --out {output.png:q} > {log:q} 2>&1"


rule plot_flags:
    input:
        flags=paths.HALLUCINATION_FLAGS.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
        synthetic=paths.SYNTHETIC_STORE.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
    output:
        png=report(
            paths.FLAGS_FIGURE.format(results=R, dataset=DATASET, variant="{variant}"),
            caption="../report/flags.rst",
            category="Hallucination flags",
        ),
    params:
    log:
        paths.LOG.format(results=R, rule="plot_flags", name=join_name(DATASET, "{variant}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "histopipe plot-flags {input.flags:q} --synthetic {input.synthetic:q} --out {output.png:q} > {log:q} 2>&1"


rule tabulate_slides:
    input:
        maps=COHORT.map_batches(),
        tiles=COHORT.tile_stores(),
    output:
        tsv=COHORT.slide_table("tsv"),
        html=report(COHORT.slide_table("html"), caption="../report/slide_table.rst", category="Slides"),
        images=report(
            directory(COHORT.report_slides()),
            patterns=["{slide}.png"],
            caption="../report/tissue_map.rst",
            category="Slides",
            subcategory="Selected slides",
            labels={"slide": "{slide}"},
        ),
    params:
        args=lambda wildcards, output: [
            "slide-table", "--tsv", output.tsv, "--html", output.html, "--images", output.images,
            "--max-slides", config["report"]["max_slides"], "--image-px", config["report"]["image_px"],
        ],
        list_columns=[COHORT.tile_stores(), COHORT.map_stores(), COHORT.tile_qc_dirs()],
        list_flag="--list",
    log:
        paths.LOG.format(results=R, rule="tabulate_slides", name=COHORT.map_id()),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/histopipe_list.py"
