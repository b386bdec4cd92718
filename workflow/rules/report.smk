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
