# With clustering.model set, slides are assigned to an existing model's tissue types and
# nothing is fitted (no samples, no k-means), whatever the cohort.
if not config["clustering"]["model"]:

    rule sample_embeddings:
        input:
            emb=paths.EMBEDDINGS.format(results=R, encoder=ENCODER, tiling=TILING, slide="{slide}"),
        output:
            sample=directory(paths.CLUSTER_SAMPLE.format(results=R, encoder=ENCODER, tiling=TILING, slide="{slide}")),
        params:
            # Only the keys that change a slide's sample: changing k or the caps of the cohort
            # step must not re-run thousands of per-slide jobs.
            cfg=json.dumps({"clustering": {k: config["clustering"][k] for k in ("per_slide_cap", "seed", "normalize")}}),
        log:
            paths.LOG.format(results=R, rule="sample_embeddings", name=join_name(ENCODER, TILING, "{slide}")),
        threads: 1
        conda:
            "../envs/histopipe.yaml"
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "histopipe sample-embeddings {input.emb:q} --out {output.sample:q} --config-json {params.cfg:q} > {log:q} 2>&1"


    rule fit_kmeans:
        input:
            samples=COHORT.cluster_samples(),
        output:
            model=directory(COHORT.fitted_cluster_model()),
        params:
            args=lambda wildcards, output: ["fit-clusters", "--config-json", config_json("clustering"), "--out", output.model],
            list_inputs=["samples"],
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
        emb=paths.EMBEDDINGS.format(results=R, encoder=ENCODER, tiling=TILING, slide="{slide}"),
        tiles=paths.TILES.format(results=R, tiling=TILING, slide="{slide}"),
    output:
        map=directory(paths.TISSUE_MAP.format(results=R, encoder=ENCODER, tiling=TILING, k=K, slide="{slide}")),
        png=report(
            paths.TISSUE_MAP_PNG.format(results=R, encoder=ENCODER, tiling=TILING, k=K, slide="{slide}"),
            caption="../report/tissue_map.rst",
            category="Tissue maps",
            labels={"slide": "{slide}"},
        ),
        geojson=paths.TISSUE_MAP_GEOJSON.format(results=R, encoder=ENCODER, tiling=TILING, k=K, slide="{slide}"),
    log:
        paths.LOG.format(results=R, rule="map_tissue_types", name=join_name(COHORT.cluster_name(), "{slide}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "histopipe assign-clusters {input.model:q} {input.emb:q} {input.tiles:q} --out {output.map:q} "
        "--png {output.png:q} --geojson {output.geojson:q} > {log:q} 2>&1"


rule map_annotation:
    input:
        slide=slide_path,
        annotation=annotation_path,
        tiles=paths.TILES.format(results=R, tiling=TILING, slide="{slide}"),
    output:
        map=directory(paths.ANNOTATION_MAP.format(results=R, tiling=TILING, slide="{slide}")),
        png=report(
            paths.ANNOTATION_MAP_PNG.format(results=R, tiling=TILING, slide="{slide}"),
            caption="../report/tissue_map.rst",
            category="Tissue maps",
            labels={"slide": "{slide}"},
        ),
        geojson=paths.ANNOTATION_MAP_GEOJSON.format(results=R, tiling=TILING, slide="{slide}"),
    params:
        labels=config["labels"]["annotation_labels"],
    log:
        paths.LOG.format(results=R, rule="map_annotation", name=join_name(TILING, "{slide}")),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "histopipe annotation-map {input.slide:q} {input.annotation:q} --tiles {input.tiles:q} "
        "--labels {params.labels:q} --out {output.map:q} --png {output.png:q} "
        "--geojson {output.geojson:q} > {log:q} 2>&1"


rule montage_tissue_types:
    input:
        maps=COHORT.map_stores(),
        tiles=COHORT.tile_stores(),
    output:
        png=report(
            paths.CLUSTER_MONTAGE.format(results=R, encoder=ENCODER, tiling=TILING, k=K),
            caption="../report/montage.rst",
            category="Tissue types",
        ),
    params:
        args=lambda wildcards, output: ["cluster-montage", "--out", output.png],
        list_inputs=["maps", "tiles"],
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
            maps=COHORT.map_stores(),
            tiles=COHORT.tile_stores(),
        output:
            model=directory(paths.STUDENT_MODEL.format(results=R, encoder=ENCODER, tiling=TILING, k=K)),
        params:
            args=lambda wildcards, output: ["train-student", "--config-json", config_json("clustering"), "--out", output.model],
            list_inputs=["maps", "tiles"],
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
