# vae.gpus / ldm.gpus > 1: the job asks for that many GPUs of one node (threads and memory
# scale with them) and the command starts one process per GPU itself.
# Variants whose pipeline ldm.models gives are not trained (nothing asks for their folder);
# when every one is, neither is the VAE.
# Checkpoints live beside the model folder (…/checkpoints), outside the declared output, so
# a preempted or failed job resumes from the newest complete checkpoint when rerun.
if not config["vae"]["pretrained"]:

    rule train_vae:
        input:
            dataset=COHORT.dataset(),
        output:
            model=directory(paths.VAE_MODEL.format(results=R, dataset=DATASET)),
        params:
            work=lambda wildcards, output: str(Path(output.model).parent),
            cfg=config_json("vae"),
        log:
            paths.LOG.format(results=R, rule="train_vae", name=DATASET),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="train_vae", name=DATASET)
        threads: 4 * gpus("vae")
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=32000 * gpus("vae"),
            runtime=1440,
            gpu=gpus("vae"),
        shell:
            "histopipe train-vae --dataset {input.dataset:q} --out {params.work:q} "
            "--config-json {params.cfg:q} > {log:q} 2>&1"


rule train_ldm:
    input:
        dataset=COHORT.dataset(),
        vae=COHORT.vae_model(),
        segmenter=COHORT.segmenter(),
    output:
        model=directory(paths.LDM_MODEL.format(results=R, dataset=DATASET, variant="{variant}")),
    params:
        work=lambda wildcards, output: str(Path(output.model).parent),
        cfg=ldm_config_json,
    log:
        paths.LOG.format(results=R, rule="train_ldm", name=join_name(DATASET, "{variant}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="train_ldm", name=join_name(DATASET, "{variant}"))
    threads: 4 * gpus("ldm")
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=32000 * gpus("ldm"),
        runtime=2880,
        gpu=gpus("ldm"),
    shell:
        "histopipe train-ldm --dataset {input.dataset:q} --vae {input.vae:q} --out {params.work:q} "
        "--segmenter {input.segmenter:q} --config-json {params.cfg:q} > {log:q} 2>&1"
