"""The real Snakefile run with the local profile on the demo cohort."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from histopipe.sheet import read_sheet
from tests.helpers import ROOT, snakemake

pytestmark = pytest.mark.slow


TILING = "mpp0.5_px256_ov128"  # config/demo.yaml


def _stores(results: Path) -> list[Path]:
    return sorted((results / "tiles" / TILING).glob("*.zarr"))


def _assert_valid_store(path: Path) -> None:
    g = zarr.open_group(str(path), mode="r")
    assert g["coords"].shape[0] == g.attrs["n_tiles"] == g["tissue_fraction"].shape[0]


def test_lint_is_clean(tmp_path, demo_cohort):
    r = snakemake(tmp_path, "--lint", "--config", f"sheet={demo_cohort}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr


def test_demo_tiling_runs_and_rerun_recomputes_nothing(tmp_path, demo_cohort):
    results = tmp_path / "results"
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={demo_cohort}", f"results={results}")
    assert r.returncode == 0, r.stderr[-3000:]
    stores = _stores(results)
    assert [p.stem for p in stores] == sorted(e.slide_id for e in read_sheet(demo_cohort))
    for p in stores:
        _assert_valid_store(p)
    summary = (results / "qc" / f"tiling_{TILING}.tsv").read_text().splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in summary[1:]}
    assert rows["cmu1_subifd"][5] == "tiffslide" and rows["cmu1_small_region"][5] == "openslide"
    assert int(rows["cmu1_mosaic_40x"][2]) > int(rows["cmu1_small_region"][2])  # 2x2 mosaic: more tissue
    assert (results / "qc" / "failed_slides.tsv").read_text().splitlines() == ["slide_id\tslide_path\treason"]
    assert (results / "logs" / "tile_slide" / TILING / "cmu1_gaps.log").exists()
    mtimes = {p: p.stat().st_mtime for p in stores}
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={demo_cohort}", f"results={results}")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr
    assert {p: p.stat().st_mtime for p in stores} == mtimes


def _job_counts(output: str) -> dict[str, int]:
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def _copy_cohort(demo_cohort: Path, dest: Path, ids: list[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["slide_id\tpath"]
    for e in read_sheet(demo_cohort):
        if e.slide_id in ids:
            lines.append(f"{e.slide_id}\t{e.path}")
    sheet = dest / "slides.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def test_parse_time_errors_name_the_slide(tmp_path, demo_cohort):
    sheet = tmp_path / "dup.tsv"
    path = read_sheet(demo_cohort)[0].path
    sheet.write_text(f"slide_id\tpath\na\t{path}\na\t{path}\n")
    r = snakemake(tmp_path, "-n", "--config", f"sheet={sheet}")
    assert r.returncode != 0 and "duplicate slide_id 'a'" in r.stdout + r.stderr
    sheet.write_text(f"slide_id\tpath\nb\t{tmp_path / 'gone.svs'}\n")
    r = snakemake(tmp_path, "-n", "--config", f"sheet={sheet}")
    assert r.returncode != 0 and "slide 'b'" in r.stdout + r.stderr and "gone.svs" in r.stdout + r.stderr
    r = snakemake(tmp_path, "-n", "--config", f"sheet={demo_cohort}", "tiling={'mpp': -1}")
    assert r.returncode != 0 and "mpp" in r.stdout + r.stderr


def test_corrupt_slide_skip_and_fail_policies(tmp_path, demo_cohort):
    sheet = _copy_cohort(demo_cohort, tmp_path, ["cmu1_small_region", "cmu1_generic"])
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(read_sheet(demo_cohort)[0].path.read_bytes()[:300_000])
    with open(sheet, "a") as fh:
        fh.write(f"broken\t{truncated}\n")
    results = tmp_path / "skip"
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={sheet}", f"results={results}", "on_error=skip")
    assert r.returncode == 0, r.stderr[-3000:]
    failed = (results / "qc" / "failed_slides.tsv").read_text().splitlines()
    assert len(failed) == 2 and failed[1].startswith("broken\t") and "truncated.svs" in failed[1]
    assert len(_stores(results)) == 3
    results = tmp_path / "fail"
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={sheet}", f"results={results}", "on_error=fail")
    assert r.returncode != 0
    assert "truncated.svs" in r.stdout + r.stderr
    assert not (results / "tiles" / TILING / "broken.zarr").exists()


def test_new_slides_only_run_their_own_jobs(tmp_path, demo_cohort):
    sheet = _copy_cohort(demo_cohort, tmp_path, ["cmu1_small_region", "cmu1_generic"])
    results = tmp_path / "results"
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={sheet}", f"results={results}")
    assert r.returncode == 0, r.stderr[-3000:]
    new = [e for e in read_sheet(demo_cohort) if e.slide_id == "cmu1_gaps"][0]
    with open(sheet, "a") as fh:
        fh.write(f"cmu1_gaps\t{new.path}\n")
    r = snakemake(tmp_path, "collect_failures", "-n", "--quiet", "rules", "--config", f"sheet={sheet}", f"results={results}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    counts = _job_counts(out)
    assert counts.get("tile_slide") == 1, out


def test_killed_run_resumes_without_corrupt_outputs(tmp_path, demo_cohort):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(ROOT / "profiles/local"), "--configfile", str(ROOT / "config/config.yaml"),
           str(ROOT / "config/demo.yaml"), "--cores", "1", "collect_failures",
           "--config", f"sheet={demo_cohort}", f"results={results}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _stores(results):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the job it is running
    proc.wait(timeout=30)
    n_done = len(_stores(results))
    assert n_done < 5, "the run finished before it could be killed"
    for p in _stores(results):
        _assert_valid_store(p)  # whatever exists under a final name is complete
    r = snakemake(tmp_path, "--unlock", "--config", f"sheet={demo_cohort}", f"results={results}")
    assert r.returncode == 0
    r = snakemake(tmp_path, "collect_failures", "--cores", "2", "--config", f"sheet={demo_cohort}", f"results={results}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_stores(results)) == 5
    for p in _stores(results):
        _assert_valid_store(p)
    assert not list(results.rglob(".*.partial"))


FAST = ROOT / "tests" / "configs" / "fast.yaml"


def test_full_demo_workflow_report_then_new_slide_with_existing_tissue_types(tmp_path, demo_cohort):
    """Every stage of the real workflow on four demo slides, the HTML report, and then a new
    slide assigned to the fitted tissue types without refitting."""
    import json

    import numpy as np

    from histopipe.dataset import PatchDataset

    sheet = _copy_cohort(demo_cohort, tmp_path / "cohort", ["cmu1_small_region", "cmu1_generic", "cmu1_subifd", "cmu1_gaps"])
    results = tmp_path / "results"
    # Four slides fill one batch: a fifth slide starts the next one. A relative results
    # folder, as `make demo` uses: list files of cohort steps must still find the stores.
    cfg = ("--config", f"sheet={sheet}", "results=results", "slides_per_batch=4")
    r = snakemake(tmp_path, "--cores", "2", *cfg, extra_configs=(FAST,), timeout=3000)
    assert r.returncode == 0, r.stderr[-4000:]

    # Tissue types and maps.
    maps = sorted((results / "maps" / "efficientnet_lite0" / TILING / "k8").glob("batch-*/*.zarr"))
    assert len(maps) == 4
    for m in maps:
        lv = np.asarray(zarr.open_group(str(m), mode="r")["map"])
        assert lv.shape[0] == 3 and lv.max() <= 8 and (lv[0] > 0).any()
        assert json.loads(m.with_suffix(".geojson").read_text())["type"] == "FeatureCollection"
    assert (results / "clusters" / "efficientnet_lite0" / TILING / "k8" / "montage.png").stat().st_size > 10_000

    # The patch dataset, split by slide.
    datasets = list((results / "dataset").glob("*/patches.zarr"))
    assert len(datasets) == 1
    ds_dir = datasets[0].parent
    info = json.loads((ds_dir / "info.json").read_text())
    assert info["n_patches"] > 20 and info["num_labels"] == 9
    train_slides = set(info["splits"]["train"]["slides"])
    assert train_slides and not train_slides & set(info["splits"]["test"]["slides"])
    item = PatchDataset(datasets[0], split="train")[0]
    assert item["image"].shape == (3, 64, 64) and item["map"].shape == (64, 64)

    # Models, synthesis and evaluation of both variants.
    name = ds_dir.name
    for variant in ("unconditional", "map_crops"):
        model = results / "models" / name / f"ldm_{variant}" / "model"
        assert (model / "model_index.json").exists()
        assert list((model.parent / "checkpoints").glob("checkpoint-*"))
        syn = zarr.open_group(str(results / "synthetic" / name / f"ldm_{variant}" / "held-out" / "synthetic.zarr"), mode="r")
        n_test = info["splits"]["test"]["patches"]
        assert syn["images"].shape == (n_test, 64, 64, 3) and syn["maps"].shape == (n_test, 64, 64)
        dist = json.loads((results / "evaluation" / name / "distribution" / f"{variant}.json").read_text())
        assert json.dumps(dist).count("efficientnet_lite0") >= 1
        # Progress evaluations at steps 3 and 6: FD, and label fidelity from the real-arm segmenter.
        progress = [json.loads(line) for line in (model.parent / "progress.jsonl").read_text().splitlines()]
        assert [p["step"] for p in progress] == [3, 6] and all("fd" in p and "label_miou" in p for p in progress)
        fidelity = json.loads((results / "evaluation" / name / "fidelity" / f"{variant}.json").read_text())
        assert fidelity["label"]["n_images"] == n_test and fidelity["crop"]["n_pairs"] > 0
        assert fidelity["crop"]["features"] == "appearance" and fidelity["crop"]["ratio"] > 0
    assert (results / "evaluation" / name / "segmentation" / "real" / "segmenter.pt").is_file()
    assert (results / "evaluation" / name / "figures" / "variants.png").stat().st_size > 1000
    table = (results / "evaluation" / name / "ablation.tsv").read_text().splitlines()
    header = table[0].split("\t")
    assert header[0] == "variant" and {"fd:efficientnet_lite0", "miou", "label_miou", "crop_fidelity"} <= set(header)
    assert [row.split("\t")[0] for row in table[1:]] == ["unconditional", "map_crops", "real"]
    real_row = dict(zip(header, table[-1].split("\t"), strict=True))
    assert float(real_row["label_miou"]) == pytest.approx(float(real_row["miou"]), abs=1e-6)  # the upper bound
    # FD and precision/recall of real patches of other slides: the reference of those columns.
    assert float(real_row["fd:efficientnet_lite0"]) >= 0 and 0 <= float(real_row["recall:efficientnet_lite0"]) <= 1

    # The self-contained HTML report.
    report = tmp_path / "report.html"
    r = snakemake(tmp_path, *cfg, "--report", str(report), extra_configs=(FAST,), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 200_000  # the figures are embedded
    for text in ("Slides", "Selected slides", "Real vs synthetic", "Metrics", "Hallucination flags", "Training", "ablation"):
        assert text in html, text
    # Every slide is a row of the slide table; its map PNG stays on disk, named there.
    table = next((results / "report").glob("efficientnet_lite0/*/k8/slides.tsv")).read_text().splitlines()
    head = table[0].split("\t")
    rows = [dict(zip(head, line.split("\t"), strict=True)) for line in table[1:]]
    assert sorted(r["slide_id"] for r in rows) == sorted(["cmu1_small_region", "cmu1_generic", "cmu1_subifd", "cmu1_gaps"])
    assert all((tmp_path / r["map_png"]).is_file() and r["top_types"] for r in rows)

    # A new crop-fidelity setting reruns the evaluations that read it; the real-arm segmenter
    # and the models that it monitors stay.
    pooled = tmp_path / "pooled.yaml"
    pooled.write_text("evaluation:\n  fidelity_features: pooled\n")
    r = snakemake(tmp_path, "-n", *cfg, extra_configs=(FAST, pooled))
    counts = _job_counts(r.stdout + r.stderr)
    assert r.returncode == 0 and counts.get("evaluate_fidelity") == 3, counts
    assert not [rule for rule in counts if rule.startswith("train_") or rule in ("synthesize", "evaluate_segmentation")], counts

    # A new slide, assigned to the fitted tissue types: only its own per-slide jobs run
    # (plus the cohort-level collections), no refit.
    model = results / "clusters" / "efficientnet_lite0" / TILING / "k8" / "model"
    new = [e for e in read_sheet(demo_cohort) if e.slide_id == "cmu1_mosaic_40x"][0]
    with open(sheet, "a") as fh:
        fh.write(f"cmu1_mosaic_40x\t{new.path}\n")
    # The fitted model exists, so the appended slide is assigned to its types: no sampling and
    # no fit, unless clustering.refit asks for them.
    r = snakemake(tmp_path, "-n", *cfg, extra_configs=(FAST,))
    counts = _job_counts(r.stdout + r.stderr)
    assert r.returncode == 0 and "fit_kmeans" not in counts and "sample_embeddings" not in counts, counts
    assert counts.get("map_tissue_types") == 1, counts
    refit = tmp_path / "refit.yaml"
    refit.write_text("clustering:\n  refit: true\n")
    r = snakemake(tmp_path, "-n", *cfg, extra_configs=(FAST, refit))
    counts = _job_counts(r.stdout + r.stderr)
    assert r.returncode == 0 and counts.get("fit_kmeans") == 1 and counts.get("map_tissue_types") == 2, counts
    reuse = tmp_path / "reuse.yaml"
    # The model as the workflow names it (relative to the working directory), so the earlier
    # batch's inputs are unchanged.
    assert model.is_dir()
    reuse.write_text(f"clustering:\n  model: {model.relative_to(tmp_path)}\n")
    r = snakemake(tmp_path, "-n", *cfg, extra_configs=(FAST, reuse))
    out = r.stdout + r.stderr
    counts = _job_counts(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts.get("tile_slide") == 1 and counts.get("embed_tiles") == 1 and counts.get("map_tissue_types") == 1
    assert counts.get("extract_patches") == 1
    assert "fit_kmeans" not in counts and "sample_embeddings" not in counts
    # Its maps and patches are the new batch's job; the full batch of earlier slides stays.
    assert "batch=00001" in out and "batch=00000" not in out, out[-4000:]

    # A new cohort through the models already trained: with clustering.model and ldm.models
    # (the run's models folder) it trains nothing. The pipelines recorded the tissue types
    # they were trained on (the chain maps -> dataset -> pipeline).
    from histopipe.clustering import ClusterModel
    from histopipe.label_space import pipeline_label_space, pipeline_record

    trained = results / "models" / name
    for variant in ("unconditional", "map_crops"):
        space = pipeline_label_space(pipeline_record(trained / f"ldm_{variant}" / "model"))
        assert space.cluster_model_id == ClusterModel.load(model).model_id and space.num_labels == 9
    new_sheet = _copy_cohort(demo_cohort, tmp_path / "new_cohort", ["cmu1_mosaic_40x", "cmu1_generic", "cmu1_small_region"])
    reuse_all = tmp_path / "reuse_all.yaml"
    reuse_all.write_text(f"clustering:\n  model: {model.relative_to(tmp_path)}\nldm:\n  models: {trained.relative_to(tmp_path)}\n")
    new_cfg = ("--config", f"sheet={new_sheet}", "results=results_new")
    r = snakemake(tmp_path, "-n", *new_cfg, extra_configs=(FAST, reuse_all))
    counts = _job_counts(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [rule for rule in counts if rule.startswith("train_") and rule != "train_segmenter"], counts
    assert "fit_kmeans" not in counts and "sample_embeddings" not in counts
    assert counts.get("tile_slide") == 3 and counts.get("embed_tiles") == 3 and counts.get("synthesize") == 2, counts
    r = snakemake(tmp_path, "--cores", "2", *new_cfg, extra_configs=(FAST, reuse_all), timeout=2400)
    assert r.returncode == 0, r.stderr[-4000:]
    new_results = tmp_path / "results_new"
    assert not (new_results / "models").exists()
    syn = zarr.open_group(str(new_results / "synthetic" / name / "ldm_map_crops" / "held-out" / "synthetic.zarr"), mode="r")
    new_info = json.loads((new_results / "dataset" / name / "info.json").read_text())
    assert syn["images"].shape[0] == new_info["splits"]["test"]["patches"] > 0
    assert syn.attrs["model"] == str(trained.relative_to(tmp_path) / "ldm_map_crops" / "model")
    rows = (new_results / "evaluation" / name / "ablation.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows[1:]] == ["unconditional", "map_crops", "real"]

    # Pipelines trained on other tissue types are refused before any job runs, naming both.
    other = tmp_path / "other_types"
    m = ClusterModel.load(model)
    ClusterModel(m.centroids[::-1].copy(), m.level_luts, m.meta).save(other)
    bad = tmp_path / "reuse_other.yaml"
    bad.write_text(f"clustering:\n  model: {other}\nldm:\n  models: {trained.relative_to(tmp_path)}\n")
    r = snakemake(tmp_path, "-n", *new_cfg, extra_configs=(FAST, bad))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "ldm.models" in out and f"cluster model {m.model_id}" in out and str(other) in out, out[-3000:]
