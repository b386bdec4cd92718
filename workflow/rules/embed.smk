rule embed_tiles:
    input:
        tiles=paths.TILES.format(results=R, tiling="{tiling}", slide="{slide}"),
    output:
        emb=directory(paths.EMBEDDINGS.format(results=R, encoder="{encoder}", tiling="{tiling}", slide="{slide}")),
    params:
        cfg=config_json("embedding"),
        workers=lambda wildcards, threads: max(threads - 1, 0),
    log:
        paths.LOG.format(results=R, rule="embed_tiles", name="{encoder}/{tiling}/{slide}"),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="embed_tiles", name="{encoder}/{tiling}/{slide}")
    threads: config["embedding"]["num_workers"] + 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    shell:
        "histopipe embed {input.tiles:q} {output.emb:q} --config-json {params.cfg:q} "
        "--num-workers {params.workers} --no-progress > {log:q} 2>&1"
