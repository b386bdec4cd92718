# Nuclei branch (config nuclei.enabled): nuclei image + label co-synthesis from the nuclei
# dataset sheet, with unlabeled nuclei patches of the WSI cohort. `snakemake nuclei` builds
# only this branch.
NUCLEI_MODE = config["nuclei"]["model"]["mode"]


rule nuclei:
    input:
        COHORT.nuclei_outputs() if config["nuclei"]["enabled"] else [],


if config["nuclei"]["enabled"]:

    rule build_nuclei_dataset:
        input:
            sheet=config["nuclei"]["sheet"],
            datasets=[str(s.path) for s in NUCLEI_SOURCES],
        output:
            store=directory(paths.NUCLEI_DATASET.format(results=R)),
        params:
            cfg=nuclei_config,
        log:
            paths.LOG.format(results=R, rule="build_nuclei_dataset", name="nuclei"),
        threads: 1
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=8000,
            runtime=120,
        shell:
            "histopipe nuclei-dataset {input.sheet:q} --out {output.store:q} --config-json {params.cfg:q} > {log:q} 2>&1"


    rule cut_nuclei_tiles:
        input:
            slides=batch_slides,
            tiles=batch_inputs(paths.TILES, tiling=TILING),
        output:
            stores=directory(paths.NUCLEI_WSI_BATCH.format(results=R, tiling=TILING, batch="{batch}")),
        params:
            commands=batch_commands("nuclei_tiles", "stores", config_json("nuclei")),
        log:
            paths.LOG.format(results=R, rule="cut_nuclei_tiles", name=join_name(TILING, "batch-{batch}")),
        threads: 1
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=4000,
            runtime=120,
        script:
            "../scripts/histopipe_batch.py"


    rule train_nuclei:
        input:
            **nuclei_train_inputs(),
        output:
            # Only the model: checkpoints beside it survive a failed or preempted job.
            model=directory(paths.NUCLEI_MODEL.format(results=R, mode=NUCLEI_MODE)),
        params:
            cfg=nuclei_config,
            work=lambda wildcards, output: str(Path(output.model).parent),
            vae=lambda wildcards, input: f"--vae {input.vae}" if "vae" in input.keys() else "",
        log:
            paths.LOG.format(results=R, rule="train_nuclei", name=NUCLEI_MODE),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="train_nuclei", name=NUCLEI_MODE)
        threads: 4 * gpus("nuclei.train")
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=32000 * gpus("nuclei.train"),
            runtime=2880,
            gpu=gpus("nuclei.train"),
        shell:
            "histopipe train-nuclei {input.store:q} --out {params.work:q} {params.vae} "
            "--config-json {params.cfg:q} > {log:q} 2>&1"


    rule fit_nuclei_layout:
        input:
            store=paths.NUCLEI_DATASET.format(results=R),
        output:
            layout=paths.NUCLEI_LAYOUT.format(results=R),
        params:
            cfg=nuclei_config,
        log:
            paths.LOG.format(results=R, rule="fit_nuclei_layout", name="nuclei"),
        threads: 1
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=4000,
            runtime=30,
        shell:
            "histopipe fit-nuclei-layout {input.store:q} --out {output.layout:q} --config-json {params.cfg:q} > {log:q} 2>&1"


    rule synthesize_nuclei:
        input:
            model=paths.NUCLEI_MODEL.format(results=R, mode=NUCLEI_MODE),
            store=paths.NUCLEI_DATASET.format(results=R),
            layout=paths.NUCLEI_LAYOUT.format(results=R),
        output:
            # Not the folder: finished parts inside it survive a failed job and are reused.
            store=directory(paths.NUCLEI_SYNTHETIC_STORE.format(results=R, mode=NUCLEI_MODE)),
            manifest=paths.NUCLEI_SYNTHETIC_MANIFEST.format(results=R, mode=NUCLEI_MODE),
        params:
            cfg=nuclei_config,
            out=lambda wildcards, output: str(Path(output.store).parent),
        log:
            paths.LOG.format(results=R, rule="synthesize_nuclei", name=NUCLEI_MODE),
        threads: 2
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=16000,
            runtime=720,
            gpu=1,
        shell:
            "histopipe synthesize-nuclei {input.model:q} --store {input.store:q} --layout {input.layout:q} "
            "--out {params.out:q} --config-json {params.cfg:q} > {log:q} 2>&1"


    rule evaluate_nuclei:
        input:
            real=paths.NUCLEI_DATASET.format(results=R),
            synthetic=paths.NUCLEI_SYNTHETIC_STORE.format(results=R, mode=NUCLEI_MODE),
        output:
            tsv=report(
                paths.NUCLEI_METRICS.format(results=R, mode=NUCLEI_MODE, ext="tsv"),
                caption="../report/nuclei_metrics.rst",
                category="Nuclei",
            ),
            json=paths.NUCLEI_METRICS.format(results=R, mode=NUCLEI_MODE, ext="json"),
            md=paths.NUCLEI_METRICS.format(results=R, mode=NUCLEI_MODE, ext="md"),
        params:
            cfg=nuclei_config,
            out=lambda wildcards, output: str(Path(output.tsv).parent),
        log:
            paths.LOG.format(results=R, rule="evaluate_nuclei", name=NUCLEI_MODE),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="evaluate_nuclei", name=NUCLEI_MODE)
        threads: 4
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=16000,
            runtime=720,
            gpu=1,
        shell:
            "histopipe evaluate-nuclei {input.real:q} --synthetic {input.synthetic:q} --out {params.out:q} "
            "--config-json {params.cfg:q} > {log:q} 2>&1"
