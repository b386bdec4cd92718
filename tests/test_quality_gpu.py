"""benchmarks/quality_gpu.py in smoke mode: the device-time script runs end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from histopipe.diffusion.models import build_vae
from tests.diffusion_helpers import one_thread, tiny_vae, write_crop_bank, write_patch_store  # noqa: F401 (autouse fixture)
from tests.helpers import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("quality_gpu", ROOT / "benchmarks" / "quality_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_mode_trains_synthesises_and_scores_a_run(tmp_path):
    """The results tree it starts from is the quality run's layout, with no segmenter in it
    (the case on a device machine, where the segmenter is trained first)."""
    results = tmp_path / "results"
    data = results / "dataset" / "d"
    patches = write_patch_store(data / "patches.zarr", n=16)
    write_crop_bank(patches, data / "crop_bank.zarr")
    build_vae(tiny_vae(), 32).save_pretrained(results / "models" / "d" / "vae" / "model")
    out = tmp_path / "out"
    module = _script()
    run = next(iter(module.RUNS))
    assert module.main(["--results", str(results), "--out", str(out), "--smoke", "--runs", run]) == 0
    assert (out / "segmenter" / "segmenter.pt").is_file()
    (row,) = json.loads((out / "quality_gpu.json").read_text())["runs"]
    assert "error" not in row, row.get("error")
    assert row["step"] == 4 and [p["step"] for p in row["progress"]] == [2, 4]
    assert row["distribution"]["variant"] == "map_crops" and row["fidelity"]["label"]["miou"] is not None
    table = (out / "quality_gpu.md").read_text()
    assert f"| {run} | 4 |" in table
