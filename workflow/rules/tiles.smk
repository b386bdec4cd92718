rule tile_slide:
    input:
        slide=slide_path,
    output:
        tiles=directory(paths.TILES.format(results=R, tiling="{tiling}", slide="{slide}")),
        qc=directory(paths.TILE_QC.format(results=R, tiling="{tiling}", slide="{slide}")),
    params:
        options=slide_options,
        cfg=config_json("tiling", "tissue"),
        on_error=config["on_error"],
    log:
        paths.LOG.format(results=R, rule="tile_slide", name="{tiling}/{slide}"),
    benchmark:
        paths.BENCHMARK.format(results=R, rule="tile_slide", name="{tiling}/{slide}")
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "histopipe tile {input.slide:q} {output.tiles:q} --slide-id {wildcards.slide} "
        "--config-json {params.cfg:q} {params.options} --on-error {params.on_error} "
        "--qc-dir {output.qc:q} > {log:q} 2>&1"


rule collect_failures:
    input:
        tiles=COHORT.tile_stores(),
    output:
        failed=paths.FAILED_SLIDES.format(results=R),
        summary=paths.TILING_SUMMARY.format(results=R, tiling=TILING),
    log:
        paths.LOG.format(results=R, rule="collect_failures", name=TILING),
    threads: 1
    conda:
        "../envs/histopipe.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/collect_failures.py"
