"""The nuclei branch of the real Snakefile (rule `nuclei`) on a CoNIC-layout dataset and a
demo slide, with the local profile."""

import json

import numpy as np
import pytest
import zarr

from histopipe.sheet import read_sheet
from tests.helpers import ROOT, run_cli, snakemake
from tests.nuclei_helpers import write_conic

pytestmark = pytest.mark.slow

CONFIGS = (ROOT / "config" / "nuclei_demo.yaml", ROOT / "tests" / "configs" / "nuclei_fast.yaml")


def _sheets(tmp_path, demo_cohort):
    write_conic(tmp_path / "conic", n=8, size=64, seed=3, sources=4)
    nuclei = tmp_path / "nuclei.tsv"
    nuclei.write_text("dataset_id\tformat\tpath\tsplit\ttissue\nconic\tconic\tconic\tauto\tcolon\n")
    slide = [e for e in read_sheet(demo_cohort) if e.slide_id == "cmu1_small_region"][0]
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(f"slide_id\tpath\n{slide.slide_id}\t{slide.path}\n")
    return sheet, nuclei


def test_nuclei_branch_runs_end_to_end_and_resumes(tmp_path, demo_cohort):
    from histopipe.nuclei.store import NucleiDataset, store_info

    sheet, nuclei = _sheets(tmp_path, demo_cohort)
    results = tmp_path / "results"
    cfg = ("--config", f"sheet={sheet}", f"results={results}", f"nuclei={json.dumps({'sheet': str(nuclei)})}")
    r = snakemake(tmp_path, "nuclei", "--cores", "2", *cfg, extra_configs=CONFIGS, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]

    real = store_info(results / "nuclei" / "dataset.zarr")
    assert real["patch_size"] == 64 and real["splits"]["train"] > 0 and real["splits"]["test"] > 0
    assert real["tissue_names"] == ["colon"]

    # The model, trained with checkpoints, and its synthetic triplets on the test point maps.
    work = results / "nuclei" / "models" / "joint"
    assert (work / "model" / "model_index.json").exists() and list((work / "checkpoints").glob("checkpoint-*"))
    syn_store = results / "nuclei" / "synthetic" / "joint" / "nuclei.zarr"
    syn = NucleiDataset(syn_store, split=None)
    assert len(syn) == real["splits"]["test"]
    item = syn[0]
    assert item["image"].shape == (3, 64, 64) and item["semantic"].shape == (64, 64)
    assert int(item["semantic"].max()) < len(real["class_names"])
    # Nuclei sit where their labels say: no instance outside the semantic foreground.
    assert not ((item["instances"] > 0) & (item["semantic"] == 0)).any()
    assert (results / "nuclei" / "synthetic" / "joint" / "manifest.tsv").stat().st_size > 0
    assert json.loads((results / "nuclei" / "layout.json").read_text())

    # Evaluation: both arms and the gain, FD in the registry encoder.
    rows = (results / "nuclei" / "evaluation" / "joint" / "metrics.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert [row.split("\t")[0] for row in rows[1:]] == ["real", "real_synthetic", "gain"]
    for col in ("dice", "aji", "pq", "f1_detection", "fd_efficientnet_lite0"):
        assert col in header, header
    metrics = json.loads((results / "nuclei" / "evaluation" / "joint" / "metrics.json").read_text())
    assert np.isfinite(metrics["fd"]["efficientnet_lite0"]["fd"])

    # Unlabeled nuclei patches of the WSI cohort: image-only store at the nuclei scale.
    wsi = list((results / "nuclei" / "wsi").glob("*/batch-00000/cmu1_small_region.zarr"))
    assert len(wsi) == 1
    images = zarr.open_group(str(wsi[0]), mode="r")["image"]
    assert images.shape == (3, 64, 64, 3) and np.asarray(images).std() > 5

    # The user-defined mode of the command line: cell-type counts and a tissue type.
    out = tmp_path / "counts"
    settings = {"nuclei": {"synthesis": {"num_images": 2, "steps": 2, "batch_size": 2}}}
    r = run_cli("synthesize-nuclei", work / "model", "--store", results / "nuclei" / "dataset.zarr", "--tissue", "colon",
                "--counts", "neutrophil=2,epithelial=3", "--out", out, "--config-json", json.dumps(settings))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(NucleiDataset(out / "nuclei.zarr", split=None)) == 2
    # The layouts asked for exactly these counts (the store holds the nuclei the model made).
    header, *lines = (out / "manifest.tsv").read_text().splitlines()
    rows = [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]
    assert len(rows) == 2 and all(r["tissue"] == "colon" and r["source"] == "counts" for r in rows)
    assert all((r["n_neutrophil"], r["n_epithelial"], r["n_lymphocyte"]) == ("2", "3", "0") for r in rows)
    r = run_cli("synthesize-nuclei", work / "model", "--store", results / "nuclei" / "dataset.zarr", "--tissue", "colon",
                "--counts", "macrophage=2", "--out", tmp_path / "bad")
    assert r.returncode != 0 and "macrophage" in r.stderr

    # A rerun finds everything done.
    r = snakemake(tmp_path, "nuclei", "-n", *cfg, extra_configs=CONFIGS)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]


def test_nuclei_sheet_errors_stop_the_workflow_at_parse_time(tmp_path, demo_cohort):
    sheet, nuclei = _sheets(tmp_path, demo_cohort)
    nuclei.write_text("dataset_id\tformat\tpath\tsplit\ttissue\nconic\tlizard\tconic\tauto\t\n")
    cfg = ("--config", f"sheet={sheet}", f"results={tmp_path / 'results'}", f"nuclei={json.dumps({'sheet': str(nuclei)})}")
    r = snakemake(tmp_path, "nuclei", "-n", *cfg, extra_configs=CONFIGS)
    assert r.returncode != 0 and "lizard" in r.stdout + r.stderr


def test_lint_is_clean_with_the_nuclei_branch(tmp_path, demo_cohort):
    sheet, nuclei = _sheets(tmp_path, demo_cohort)
    cfg = ("--config", f"sheet={sheet}", f"nuclei={json.dumps({'sheet': str(nuclei)})}")
    r = snakemake(tmp_path, "--lint", *cfg, extra_configs=CONFIGS)
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr
