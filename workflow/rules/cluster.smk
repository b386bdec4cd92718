# With clustering.model set, slides are assigned to an existing model's tissue types and
# nothing is fitted (no samples, no k-means), whatever the cohort. Once the fitted model
# exists it is kept (appended slides are assigned to it) unless clustering.refit is set.
if COHORT.fits_clusters:

    rule sample_embeddings:
        input:
            emb=batch_inputs(paths.EMBEDDINGS, encoder=ENCODER, tiling=TILING),
        output:
            samples=directory(paths.CLUSTER_SAMPLE_BATCH.format(results=R, encoder=ENCODER, tiling=TILING, batch="{batch}")),
        params:
            # Only the keys that change a slide's sample: changing k or the caps of the cohort
            # step must not re-run the sampling of every batch.
            commands=batch_commands(
                "sample",
                "samples",
                json.dumps({"clustering": {k: config["clustering"][k] for k in ("per_slide_cap", "seed", "normalize")}}),
            ),
        log:
            paths.LOG.format(results=R, rule="sample_embeddings", name=join_name(ENCODER, TILING, "batch-{batch}")),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="sample_embeddings", name=join_name(ENCODER, TILING, "batch-{batch}"))
        threads: 1
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=2000,
            runtime=60,
        script:
            "../scripts/histopipe_batch.py"


    # Level one of the two-level fit: every sampled tile of a batch, summarised into
    # weighted sub-centroids; one independent job per batch.
    rule summarize_samples:
        input:
            samples=paths.CLUSTER_SAMPLE_BATCH.format(results=R, encoder=ENCODER, tiling=TILING, batch="{batch}"),
        output:
            summary=directory(paths.CLUSTER_SUMMARY.format(results=R, encoder=ENCODER, tiling=TILING, batch="{batch}")),
        params:
            args=lambda wildcards, output: ["summarize-samples", "--config-json", config_json("clustering"), "--out", output.summary],
            list_columns=lambda wildcards: [batch_inputs(paths.CLUSTER_SAMPLE, encoder=ENCODER, tiling=TILING)(wildcards)],
            list_flag="--samples-list",
        log:
            paths.LOG.format(results=R, rule="summarize_samples", name=join_name(ENCODER, TILING, "batch-{batch}")),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="summarize_samples", name=join_name(ENCODER, TILING, "batch-{batch}"))
        threads: 2
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=4000,
            runtime=60,
        script:
            "../scripts/histopipe_list.py"


    rule fit_kmeans:
        input:
            samples=COHORT.cluster_sample_batches(),
            summaries=COHORT.cluster_summaries() if TWO_LEVEL else [],
        output:
            model=directory(COHORT.fitted_cluster_model()),
        params:
            args=lambda wildcards, input, output: [
                "fit-clusters", "--config-json", config_json("clustering"), "--out", output.model,
                *(["--summaries", *input.summaries] if TWO_LEVEL else []),
            ],
            list_columns=[COHORT.cluster_samples()],
            list_flag="--samples-list",
        log:
            paths.LOG.format(results=R, rule="fit_kmeans", name=COHORT.cluster_name()),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="fit_kmeans", name=COHORT.cluster_name())
        threads: 2
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=16000,
            runtime=240,
        script:
            "../scripts/histopipe_list.py"


rule map_tissue_types:
    input:
        model=COHORT.cluster_model(),
        emb=batch_inputs(paths.EMBEDDINGS, encoder=ENCODER, tiling=TILING),
        tiles=batch_inputs(paths.TILES, tiling=TILING),
    output:
        maps=directory(paths.TISSUE_MAP_BATCH.format(results=R, encoder=ENCODER, tiling=TILING, k=K, batch="{batch}")),
    params:
        commands=batch_commands("map", "maps"),
    log:
        paths.LOG.format(results=R, rule="map_tissue_types", name=join_name(COHORT.cluster_name(), "batch-{batch}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="map_tissue_types", name=join_name(COHORT.cluster_name(), "batch-{batch}"))
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=120,
    script:
        "../scripts/histopipe_batch.py"


rule map_annotation:
    input:
        slides=batch_slides,
        annotations=batch_annotations,
        tiles=batch_inputs(paths.TILES, tiling=TILING),
    output:
        maps=directory(paths.ANNOTATION_MAP_BATCH.format(results=R, tiling=TILING, batch="{batch}")),
    params:
        commands=batch_commands("map", "maps"),
    log:
        paths.LOG.format(results=R, rule="map_annotation", name=join_name(TILING, "batch-{batch}")),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="map_annotation", name=join_name(TILING, "batch-{batch}"))
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=120,
    script:
        "../scripts/histopipe_batch.py"


rule montage_tissue_types:
    input:
        maps=COHORT.map_batches(),
        tiles=COHORT.tile_stores(),
    output:
        png=report(
            paths.CLUSTER_MONTAGE.format(results=R, encoder=ENCODER, tiling=TILING, k=K),
            caption="../report/montage.rst",
            category="Tissue types",
        ),
    params:
        args=lambda wildcards, output: ["cluster-montage", "--out", output.png],
        list_columns=[COHORT.map_stores(), COHORT.tile_stores()],
        list_flag="--list",
    log:
        paths.LOG.format(results=R, rule="montage_tissue_types", name=COHORT.cluster_name()),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/histopipe_list.py"


# Optional: a light pixel classifier trained on the tissue types, to label new slides
# without the foundation model; its agreement on held-out slides is in metrics.json.
if config["clustering"]["student"]["enabled"]:

    rule train_student:
        input:
            maps=COHORT.map_batches(),
            tiles=COHORT.tile_stores(),
        output:
            model=directory(paths.STUDENT_MODEL.format(results=R, encoder=ENCODER, tiling=TILING, k=K)),
        params:
            args=lambda wildcards, output: ["train-student", "--config-json", config_json("clustering"), "--out", output.model],
            list_columns=[COHORT.map_stores(), COHORT.tile_stores()],
            list_flag="--list",
        log:
            paths.LOG.format(results=R, rule="train_student", name=COHORT.cluster_name()),
        benchmark:
            paths.BENCHMARK.format(results=R, rule="train_student", name=COHORT.cluster_name())
        threads: 4
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=16000,
            runtime=720,
            gpu=1,
        script:
            "../scripts/histopipe_list.py"
