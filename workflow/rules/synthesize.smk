rule synthesize:
    input:
        # The pipeline trained here, or the one ldm.models reuses.
        model=lambda wildcards: COHORT.ldm_model(wildcards.variant),
        dataset=COHORT.dataset(),
    output:
        # The store and manifest, not their folder: finished batches (parts/) beside them
        # survive a failed or preempted job, and a rerun resumes from them.
        store=directory(paths.SYNTHETIC_STORE.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out")),
        manifest=paths.SYNTHETIC_MANIFEST.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
    params:
        cfg=config_json("synthesis"),
        split=config["evaluation"]["real_split"],
        out=lambda wildcards, output: str(Path(output.manifest).parent),
    log:
        paths.LOG.format(results=R, rule="synthesize", name=join_name(DATASET, "{variant}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="synthesize", name=join_name(DATASET, "{variant}"))
    threads: 2 * gpus("synthesis")
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=16000 * gpus("synthesis"),
        runtime=720,
        gpu=gpus("synthesis"),
    shell:
        "histopipe synthesize --model {input.model:q} --out {params.out:q} --mode held-out "
        "--dataset {input.dataset:q} --split {params.split} --config-json {params.cfg:q} > {log:q} 2>&1"


rule flag_hallucinations:
    input:
        synthetic=paths.SYNTHETIC_STORE.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
        dataset=COHORT.dataset(),
    output:
        flags=paths.HALLUCINATION_FLAGS.format(results=R, dataset=DATASET, variant="{variant}", mode="held-out"),
    params:
        cfg=config_json("synthesis"),
    log:
        paths.LOG.format(results=R, rule="flag_hallucinations", name=join_name(DATASET, "{variant}")),
    threads: 2
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "histopipe flag-hallucinations --synthetic {input.synthetic:q} --real {input.dataset:q} "
        "--out {output.flags:q} --config-json {params.cfg:q} > {log:q} 2>&1"
