"""The ablation table and the evaluation figures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from histopipe.errors import HistopipeError
from histopipe.evaluation.ablation import (
    assemble,
    read_tsv_table,
    to_html,
    to_markdown,
    write_table,
)
from histopipe.evaluation.distribution import evaluate_distribution
from histopipe.evaluation.features import ImageSet
from histopipe.evaluation.figures import (
    _font,
    _wrap,
    colour_map,
    grid_from_stores,
    metric_panels,
    real_vs_synthetic_grid,
    tissue_palette,
)
from histopipe.evaluation.outputs import write_json
from histopipe.evaluation.segmentation import evaluate_segmentation
from histopipe.evaluation.settings import EvaluationSettings, SegmentationSettings
from tests.evaluation_helpers import (
    one_thread,
    run_cli,
    tiny_factory,
    toy_patches,
    write_patch_store,
    write_synthetic_store,
)

# The published Camelyon16 numbers (core paper) as metric files of the pipeline's shape.
PAPER = {  # variant: (FD ResNet50-BT, FD DINOv2, mIoU synthetic only)
    "unconditional": (430.1, 122.0, 0.63),
    "map_crop_embeddings": (183.0, 289.6, 0.69),
    "map_crops": (72.0, 52.7, 0.71),
}


def distribution_json(variant, fds, precision=0.5):
    return {
        "kind": "distribution", "variant": variant, "seed": 0, "knn_k": 5,
        "real": {"split": "test", "n_used": 1000}, "synthetic": {"n_used": 900},
        "encoders": {
            enc: {"fd": fd, "precision": precision, "recall": 0.4, "density": 0.9, "coverage": 0.6}
            for enc, fd in zip(("resnet50_bt", "dinov2"), fds, strict=True)
        },
    }


def segmentation_json(variant, mode, miou):
    return {
        "kind": "segmentation", "variant": variant, "mode": mode, "seed": 0, "miou": miou,
        "mdice": miou + 0.1, "test": {"n_used": 500},
        "settings": {"encoder": "resnet18", "steps": 2000, "batch_size": 8},
    }


@pytest.fixture
def paper_results():
    out = [distribution_json(v, fds[:2]) for v, fds in PAPER.items()]
    out += [segmentation_json(v, "synthetic", fds[2]) for v, fds in PAPER.items()]
    out += [segmentation_json("real", "real", 0.72),
            segmentation_json("map_crops", "both", 0.74)]
    return out[::-1]  # input order must not matter


def test_rows_follow_the_configured_variants_and_real_comes_last(paper_results):
    order = ("unconditional", "map", "map_crop_embeddings", "map_crops")
    table = assemble(paper_results, order)
    assert [r["variant"] for r in table.rows] == [
        "unconditional", "map_crop_embeddings", "map_crops", "real"]
    assert table.columns[:4] == ["variant", "n_synthetic", "fd:resnet50_bt", "fd:dinov2"]
    assert table.columns[-4:] == ["miou", "mdice", "miou_both", "mdice_both"]
    by = {r["variant"]: r for r in table.rows}
    assert by["map_crops"]["fd:resnet50_bt"] == 72.0 and by["unconditional"]["fd:dinov2"] == 122.0
    assert by["real"]["miou"] == 0.72 and "fd:dinov2" not in by["real"]
    assert by["map_crops"]["miou_both"] == 0.74
    assert any("k=5" in n for n in table.notes) and any("500 real test" in n for n in table.notes)


def test_renderings_mark_the_best_value_per_column(paper_results):
    table = assemble(paper_results)
    md = to_markdown(table)
    assert "| FD (resnet50_bt) |" in md.splitlines()[0]
    # Lowest FD, highest mIoU among the synthetic variants; the real row is their reference.
    assert "**72.0**" in md and "**52.7**" in md and "**0.710**" in md
    assert "**430.1**" not in md and "**0.720**" not in md and "0.720" in md
    page = to_html(table)
    assert page.startswith("<!DOCTYPE html>") and page.count("<tr>") == 1 + len(table.rows)
    assert '<td class="best">72.0</td>' in page


def test_written_tsv_reads_back(paper_results, tmp_path):
    table = assemble(paper_results, order=tuple(PAPER))
    outs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "html", "png")]
    write_table(table, outs)
    assert all(p.stat().st_size > 0 for p in outs)
    back = read_tsv_table(outs[0])
    assert back.columns == table.columns
    assert back.rows[2]["fd:dinov2"] == pytest.approx(52.7) and back.rows[3]["fd:dinov2"] is None
    assert Image.open(outs[3]).size[0] > 100
    with pytest.raises(HistopipeError, match="unknown table format"):
        write_table(table, [tmp_path / "t.xlsx"])


def test_a_metric_given_twice_is_an_error(paper_results):
    with pytest.raises(HistopipeError, match="given twice"):
        assemble(paper_results + [segmentation_json("real", "real", 0.5)])
    with pytest.raises(HistopipeError, match="not a histopipe metrics file"):
        assemble([{"kind": "other"}])


def test_palette_is_fixed_and_distinct():
    pal = tissue_palette(101)
    assert pal.shape == (101, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == (0, 0, 0)
    assert len({tuple(c) for c in pal}) == 101
    assert np.array_equal(pal[:5], tissue_palette(5))  # a label's colour never depends on k
    rgb = colour_map(np.array([[0, 3], [200, 1]]), tissue_palette(4))
    assert tuple(rgb[0, 1]) == tuple(pal[3]) and tuple(rgb[1, 0]) == (255, 255, 255)


def test_grid_places_maps_and_images(tmp_path):
    rng = np.random.default_rng(0)
    images, maps = toy_patches(6, 48, rng)
    real = write_patch_store(tmp_path / "p.zarr", images, maps, np.zeros(6))
    syn_images, syn_maps = toy_patches(4, 32, np.random.default_rng(1))
    syn = write_synthetic_store(tmp_path / "s.zarr", syn_images, syn_maps, "map",
                                source_index=np.array([5, 4, 3, 2]))
    grid = grid_from_stores(ImageSet.open(real), ImageSet.open(syn), n=4, seed=0)
    tile, gap, top = 192, 4, 48
    assert grid.size == (4 * tile + 5 * gap, grid.size[1])
    arr = np.asarray(grid)
    # Row 0 is synthetic sample 0 (n = all), paired with real patch 5 by source_index.
    centre = (top + tile // 2, gap + tile // 2)
    pal = tissue_palette(3)
    assert tuple(arr[centre]) == tuple(pal[maps[5][24, 24]])
    syn_centre = (top + tile // 2, gap + 2 * (tile + gap) + tile // 2)
    assert tuple(arr[syn_centre]) == tuple(pal[syn_maps[0][16, 16]])
    with pytest.raises(HistopipeError, match="same non-zero number"):
        real_vs_synthetic_grid(images[:2], maps[:2], syn_images[:3], syn_maps[:3], 3)


def test_column_headers_wrap_to_the_tile_width():
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(14)
    for name in ("map_crop_embeddings", "map_crops", "crops given", "a_name_with_several_long_parts"):
        lines = _wrap(draw, name, font, 128)
        assert "".join(lines).replace(" ", "") == name.replace(" ", "")  # nothing lost
        assert all(draw.textlength(line, font=font) <= 128 for line in lines) or len(lines) == 1
    assert len(_wrap(draw, "map_crop_embeddings", font, 128)) == 2 and _wrap(draw, "map_crops", font, 128) == ["map_crops"]


def test_metric_panels(paper_results, tmp_path):
    table = assemble(paper_results)
    metric_panels(table, "fd", tmp_path / "fd.png")
    two = Image.open(tmp_path / "fd.png")
    metric_panels(table, "miou", tmp_path / "miou.png")
    one = Image.open(tmp_path / "miou.png")
    assert two.size[0] > one.size[0]  # one panel per encoder
    with pytest.raises(HistopipeError, match="no 'psnr' column"):
        metric_panels(table, "psnr", tmp_path / "x.png")


@pytest.mark.slow
def test_table_and_figures_from_real_metric_files(tmp_path):
    rng = np.random.default_rng(0)
    images, maps = toy_patches(16, 32, rng)
    real = write_patch_store(tmp_path / "p.zarr", images, maps, np.repeat([0, 2], 8))
    syn_images, syn_maps = toy_patches(8, 32, np.random.default_rng(1))
    syn = write_synthetic_store(tmp_path / "s.zarr", syn_images, syn_maps, "map_crops")
    settings = EvaluationSettings(encoders=("tiny_a",), device="cpu", knn_k=2, batch_size=8,
                                  segmentation=SegmentationSettings(steps=1, batch_size=2,
                                                                    num_workers=0))
    with one_thread():
        dist = evaluate_distribution(ImageSet.open(real, "test"), ImageSet.open(syn), settings,
                                     encoder_factory=tiny_factory)
        seg_syn = evaluate_segmentation("synthetic", real, syn, settings)
        seg_real = evaluate_segmentation("real", real, None, settings)
    inputs = []
    for name, res in (("d", dist), ("s", seg_syn), ("r", seg_real)):
        write_json(tmp_path / f"{name}.json", res)
        inputs.append(tmp_path / f"{name}.json")
    out = tmp_path / "table"
    run_cli("ablation-table", "--inputs", *inputs, "--out", f"{out}.tsv", "--out", f"{out}.md",
            "--out", f"{out}.html")
    rows = list(csv.DictReader(open(f"{out}.tsv"), delimiter="\t"))
    assert [r["variant"] for r in rows] == ["map_crops", "real"]
    assert float(rows[0]["fd:tiny_a"]) == pytest.approx(dist["encoders"]["tiny_a"]["fd"], rel=1e-5)
    assert float(rows[1]["miou"]) == pytest.approx(seg_real["miou"], rel=1e-5)
    assert json.loads((tmp_path / "s.json").read_text())["variant"] == "map_crops"

    run_cli("figures", "metrics", "--table", f"{out}.tsv", "--metric", "fd", "--out",
            tmp_path / "fd.png")
    run_cli("figures", "grid", "--real", real, "--synthetic", syn, "--n", "3", "--out",
            tmp_path / "grid.png")
    assert Image.open(tmp_path / "fd.png").format == "PNG"
    assert Image.open(tmp_path / "grid.png").size[0] == 4 * 192 + 5 * 4
