import json

import numpy as np
import zarr

from histopipe.pyramid import write_pyramid
from tests.helpers import run_cli


def test_help_explains_units():
    out = run_cli("tile", "--help").stdout
    assert "µm/px" in out and "px" in out and "--tile-size" in out
    assert "level-0" in run_cli("--help").stdout


def test_info_prints_json(cmu_slide):
    r = run_cli("info", cmu_slide)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"] == "openslide" and info["vendor"] == "aperio"
    assert (info["width"], info["height"]) == (2220, 2967) and info["mpp"] == 0.499
    r = run_cli("info", cmu_slide, "--backend", "tiffslide")
    assert json.loads(r.stdout)["backend"] == "tiffslide"


def test_tile_writes_store_and_summary(tmp_path, cmu_slide):
    out = tmp_path / "t.zarr"
    r = run_cli("tile", cmu_slide, out, "--mpp", "1.0", "--tile-size", "128", "--backend", "tiffslide")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "tiles of 128 px at 1 µm/px" in r.stdout
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["tiling"] == "mpp1_px128" and g.attrs["backend"] == "tiffslide" and g["coords"].shape[0] > 0


def _one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(err) == 1, r.stderr
    for f in fragments:
        assert f in err[0], err[0]


def test_bad_inputs_give_one_line_naming_the_file(tmp_path, cmu_slide, cmu_image):
    _one_line_error(run_cli("tile", tmp_path / "missing.svs", tmp_path / "o.zarr"), "missing.svs", "file not found")
    junk = tmp_path / "junk.ndpi"
    junk.write_bytes(b"\x00" * 4096)
    _one_line_error(run_cli("tile", junk, tmp_path / "o.zarr"), "junk.ndpi", "unsupported or corrupt")
    nompp = write_pyramid(tmp_path / "nompp.tiff", cmu_image[:1024, :1024], None, levels=(1,))
    _one_line_error(run_cli("tile", nompp, tmp_path / "o.zarr"), "nompp.tiff", "no µm/px")
    _one_line_error(run_cli("tile", cmu_slide, tmp_path / "o.zarr", "--mpp", "0.1"), "cmu1_small_region.svs", "coarser than the target")
    _one_line_error(run_cli("tile", cmu_slide, tmp_path / "o.zarr", "--overlap", "300"), "overlap")
    _one_line_error(run_cli("info", junk), "junk.ndpi")
    assert not (tmp_path / "o.zarr").exists()
    # With an mpp override the slide without metadata tiles fine.
    r = run_cli("tile", nompp, tmp_path / "o.zarr", "--slide-mpp", "0.5")
    assert r.returncode == 0, r.stderr


def test_skip_policy_writes_failed_store(tmp_path, cmu_slide):
    truncated = tmp_path / "trunc.svs"
    truncated.write_bytes(cmu_slide.read_bytes()[:300_000])
    r = run_cli("tile", truncated, tmp_path / "t.zarr", "--on-error", "skip", "--qc-dir", tmp_path / "qc")
    assert r.returncode == 0, r.stderr
    assert "FAILED" in r.stdout
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert g.attrs["status"] == "failed" and "trunc.svs" in g.attrs["reason"]
    assert np.asarray(g["coords"]).shape == (0, 2)
    assert "trunc.svs" in (tmp_path / "qc" / "trunc.error.txt").read_text()
    r = run_cli("tile", truncated, tmp_path / "t2.zarr")
    _one_line_error(r, "trunc.svs")


def test_demo_cohort_command(tmp_path):
    r = run_cli("demo-cohort", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    sheet = (tmp_path / "demo" / "slides.tsv").read_text().splitlines()
    assert len(sheet) == 6 and sheet[0].startswith("slide_id\tpath")
