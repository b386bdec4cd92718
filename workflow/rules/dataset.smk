rule extract_patches:
    input:
        map=map_store,
        slide=slide_path,
    output:
        patches=directory(paths.SLIDE_PATCHES.format(results=R, dataset=DATASET, slide="{slide}")),
    params:
        cfg=config_json("patches"),
        options=slide_options,
        on_error=config["on_error"],
    log:
        paths.LOG.format(results=R, rule="extract_patches", name=join_name(DATASET, "{slide}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "histopipe extract-patches {input.map:q} {input.slide:q} --out {output.patches:q} "
        "--slide-id {wildcards.slide} {params.options} --on-error {params.on_error} "
        "--config-json {params.cfg:q} > {log:q} 2>&1"


rule merge_patches:
    input:
        patches=COHORT.slide_patch_stores(),
    output:
        dataset=directory(paths.DATASET.format(results=R, dataset=DATASET)),
    params:
        args=lambda wildcards, output: ["merge-patches", "--config-json", config_json("patches"), "--out", output.dataset],
        list_inputs=["patches"],
        list_flag="--list",
    log:
        paths.LOG.format(results=R, rule="merge_patches", name=DATASET),
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
