"""The GPU check's CPU smoke mode: every step of benchmarks/gpu_check.py runs at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_smoke_mode_writes_the_json_and_the_table(tmp_path):
    assert _gpu_check().main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "smoke" and result["system"]["torch"]
    assert [r["name"] for r in result["embedding"]] == ["timm:vit_tiny_patch16_224", "efficientnet_lite0"]
    for r in result["embedding"]:
        assert r["tiles"] > 0 and r["end_to_end_tiles_s"] > 0 and r["model_only_tiles_s"] > 0
    (ldm,) = result["ldm"]
    assert ldm["size"] == 32
    for key in ("train_images_s", "sample_images_s", "vae_encode_images_s", "vae_decode_images_s"):
        assert ldm[key] > 0, key
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| ViT-Ti/16" in table and "DPM++ 25 + CFG" in table and "ViT-L end to end" in table
