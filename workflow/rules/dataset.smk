rule extract_patches:
    input:
        maps=lambda wildcards: COHORT.map_batch(wildcards.batch),
        slides=batch_slides,
    output:
        patches=directory(paths.SLIDE_PATCHES_BATCH.format(results=R, dataset=DATASET, batch="{batch}")),
    params:
        commands=batch_commands("patches", "patches", config_json("patches")),
    log:
        paths.LOG.format(results=R, rule="extract_patches", name=join_name(DATASET, "batch-{batch}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="extract_patches", name=join_name(DATASET, "batch-{batch}"))
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=240,
    script:
        "../scripts/histopipe_batch.py"


rule merge_patches:
    input:
        patches=COHORT.slide_patch_batches(),
    output:
        dataset=directory(paths.DATASET.format(results=R, dataset=DATASET)),
    params:
        args=lambda wildcards, output: ["merge-patches", "--config-json", config_json("patches"), "--out", output.dataset],
        list_columns=[COHORT.slide_patch_stores()],
        list_flag="--list",
    log:
        paths.LOG.format(results=R, rule="merge_patches", name=DATASET),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="merge_patches", name=DATASET)
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/histopipe_list.py"


rule build_crop_bank:
    input:
        dataset=paths.DATASET.format(results=R, dataset=DATASET),
    output:
        bank=directory(paths.CROP_BANK.format(results=R, dataset=DATASET)),
    params:
        cfg=config_json("patches"),
    log:
        paths.LOG.format(results=R, rule="build_crop_bank", name=DATASET),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "histopipe crop-bank {input.dataset:q} --out {output.bank:q} --config-json {params.cfg:q} > {log:q} 2>&1"


rule describe_dataset:
    input:
        dataset=paths.DATASET.format(results=R, dataset=DATASET),
    output:
        info=paths.DATASET_INFO.format(results=R, dataset=DATASET),
    log:
        paths.LOG.format(results=R, rule="describe_dataset", name=DATASET),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "histopipe dataset-info {input.dataset:q} --json --out {output.info:q} > {log:q} 2>&1"
