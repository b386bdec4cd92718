rule evaluate_distribution:
    input:
        unpack(distribution_inputs),
    output:
        json=paths.EVAL_DISTRIBUTION.format(results=R, dataset=DATASET, variant="{variant}"),
        tsv=paths.EVAL_DISTRIBUTION_TSV.format(results=R, dataset=DATASET, variant="{variant}"),
    params:
        cfg=config_json("evaluation"),
        source=distribution_source,
    log:
        paths.LOG.format(results=R, rule="evaluate_distribution", name=join_name(DATASET, "{variant}")),
    threads: 2
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    shell:
        "histopipe evaluate-distribution --real {input.dataset:q} {params.source} "
        "--variant {wildcards.variant} --out {output.json:q} --tsv {output.tsv:q} "
        "--config-json {params.cfg:q} > {log:q} 2>&1"


# The real arm: DeepLabv3+ trained on real patches only. Its model judges the label fidelity
# of synthetic images (and of samples during LDM training); its test score is the upper bound.
rule train_segmenter:
    input:
        dataset=COHORT.dataset(),
    output:
        json=paths.EVAL_SEGMENTATION.format(results=R, dataset=DATASET, mode="real", variant="real"),
        model=COHORT.segmenter(),
    params:
        cfg=evaluation_json(SEGMENTATION_SETTINGS),
    log:
        paths.LOG.format(results=R, rule="train_segmenter", name=DATASET),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="train_segmenter", name=DATASET)
    threads: 2
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    shell:
        "histopipe evaluate-segmentation --train-real {input.dataset:q} --mode real --variant real "
        "--out {output.json:q} --model-out {output.model:q} --config-json {params.cfg:q} > {log:q} 2>&1"


rule evaluate_segmentation:
    input:
        dataset=COHORT.dataset(),
        synthetic=paths.SYNTHETIC_STORE.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
    output:
        json=paths.EVAL_SEGMENTATION.format(results=R, dataset=DATASET, mode="{mode}", variant="{variant}"),
    wildcard_constraints:
        mode="synthetic|both",
    params:
        cfg=evaluation_json(SEGMENTATION_SETTINGS),
    log:
        paths.LOG.format(results=R, rule="evaluate_segmentation", name=join_name(DATASET, "{mode}", "{variant}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="evaluate_segmentation", name=join_name(DATASET, "{mode}", "{variant}"))
    threads: 2
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    shell:
        "histopipe evaluate-segmentation --train-real {input.dataset:q} --train-synthetic {input.synthetic:q} "
        "--mode {wildcards.mode} --variant {wildcards.variant} --out {output.json:q} "
        "--config-json {params.cfg:q} > {log:q} 2>&1"


rule evaluate_fidelity:
    input:
        unpack(fidelity_inputs),
    output:
        json=paths.EVAL_FIDELITY.format(results=R, dataset=DATASET, variant="{variant}"),
    params:
        cfg=config_json("evaluation"),
        source=fidelity_source,
    log:
        paths.LOG.format(results=R, rule="evaluate_fidelity", name=join_name(DATASET, "{variant}")),
    threads: 2
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    shell:
        "histopipe evaluate-fidelity {params.source} --real {input.dataset:q} "
        "--segmenter {input.segmenter:q} --crop-bank {input.crop_bank:q} --variant {wildcards.variant} "
        "--out {output.json:q} --config-json {params.cfg:q} > {log:q} 2>&1"


rule plot_real_vs_synthetic:
    input:
        synthetic=paths.SYNTHETIC_STORE.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
        dataset=COHORT.dataset(),
    output:
        png=report(
            paths.EVAL_GRID_PNG.format(results=R, dataset=DATASET, variant="{variant}"),
            caption="../report/grid.rst",
            category="Real vs synthetic",
            subcategory="{variant}",
        ),
    params:
        cfg=config_json("evaluation"),
    log:
        paths.LOG.format(results=R, rule="plot_real_vs_synthetic", name=join_name(DATASET, "{variant}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "histopipe figures grid --real {input.dataset:q} --synthetic {input.synthetic:q} "
        "--out {output.png:q} --config-json {params.cfg:q} > {log:q} 2>&1"


rule plot_variants:
    input:
        synthetic=[COHORT.synthetic(v) for v in COHORT.variants],
        dataset=COHORT.dataset(),
    output:
        png=report(
            paths.EVAL_VARIANTS_PNG.format(results=R, dataset=DATASET),
            caption="../report/variants.rst",
            category="Real vs synthetic",
        ),
    params:
        cfg=config_json("evaluation"),
    log:
        paths.LOG.format(results=R, rule="plot_variants", name=DATASET),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "histopipe figures variants --real {input.dataset:q} --synthetic {input.synthetic:q} "
        "--out {output.png:q} --config-json {params.cfg:q} > {log:q} 2>&1"


rule tabulate_ablation:
    input:
        distribution=COHORT.evaluation_outputs("distribution"),
        fidelity=COHORT.evaluation_outputs("fidelity"),
        segmentation=COHORT.evaluation_outputs("segmentation"),
    output:
        tsv=paths.ABLATION_TABLE.format(results=R, dataset=DATASET, ext="tsv"),
        md=paths.ABLATION_TABLE.format(results=R, dataset=DATASET, ext="md"),
        html=report(
            paths.ABLATION_TABLE.format(results=R, dataset=DATASET, ext="html"),
            caption="../report/ablation.rst",
            category="Metrics",
        ),
    params:
        cfg=config_json("evaluation"),
    log:
        paths.LOG.format(results=R, rule="tabulate_ablation", name=DATASET),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "histopipe ablation-table --inputs {input.distribution:q} {input.fidelity:q} {input.segmentation:q} "
        "--out {output.tsv:q} --out {output.md:q} --out {output.html:q} "
        "--config-json {params.cfg:q} > {log:q} 2>&1"


rule plot_ablation:
    input:
        tsv=paths.ABLATION_TABLE.format(results=R, dataset=DATASET, ext="tsv"),
    output:
        png=report(
            paths.ABLATION_FIGURE.format(results=R, dataset=DATASET, metric="{metric}"),
            caption="../report/ablation_figure.rst",
            category="Metrics",
        ),
    log:
        paths.LOG.format(results=R, rule="plot_ablation", name=join_name(DATASET, "{metric}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "histopipe figures metrics --table {input.tsv:q} --metric {wildcards.metric} "
        "--out {output.png:q} > {log:q} 2>&1"


# The paper's ablation as one target: `snakemake ablation` trains every variant of
# evaluation.variants on the same data, budget and seeds, and tabulates FD per encoder,
# precision/recall and downstream mIoU per variant.
rule ablation:
    input:
        COHORT.ablation_outputs(),
    default_target: False
