"""The per-slide table and the report's bounded selection of slide images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from histopipe.maps_io import write_map_store
from histopipe.slide_table import (
    SlideRow,
    flag_outliers,
    read_rows,
    select_slides,
    write_html,
    write_selected_images,
    write_tsv,
)
from tests.helpers import run_cli


def _row(i: int, types: np.ndarray, status: str = "ok", n_tiles: int = 100, area: float = 20.0, reason: str = "") -> SlideRow:
    return SlideRow(f"s{i:05d}", status, n_tiles, area, reason, types, f"/maps/s{i:05d}.png", f"/qc/s{i:05d}.tissue.png")


def _cohort(n: int, k: int, seed: int = 0) -> list[SlideRow]:
    """n slides over k tissue types: each shows 3 common types, and type k-1 only one slide."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = np.zeros(k)
        t[rng.choice(k - 1, 3, replace=False)] = rng.dirichlet(np.ones(3))
        rows.append(_row(i, t, n_tiles=int(rng.integers(80, 120)), area=float(rng.uniform(15, 25))))
    rare = rows[n // 2]
    rare.types = rare.types * 0.9
    rare.types[k - 1] = 0.1
    return rows


def test_selection_is_bounded_and_covers_types_failures_and_outliers():
    for n in (60, 1000, 10_000):
        rows = _cohort(n, k=20, seed=n)
        rows[7] = _row(7, np.zeros(20), "failed", 0, float("nan"), f"/data/s{7:05d}.svs: unsupported or corrupt slide file")
        rows[8] = _row(8, np.zeros(20), "failed", 0, float("nan"), f"/data/s{8:05d}.svs: unsupported or corrupt slide file")
        rows[9] = _row(9, np.zeros(20), "empty", 0, 0.0, "no tissue detected")
        rows[11].n_tiles, rows[11].tissue_mm2 = 3, 0.4  # a fragment
        flag_outliers(rows)
        assert rows[11].flags == ["tiles_low", "tissue_area_low"]
        assert sum(bool(r.flags) for r in rows) <= max(1, n // 200), [r.flags for r in rows if r.flags][:10]
        chosen = select_slides(rows, max_slides=12)
        assert len(chosen) == 12
        by_id = {r.slide_id: r for r in rows}
        # One per failure kind (the two unreadable files are one kind), every outlier flag.
        assert sum(by_id[s].status == "failed" for s in chosen) == 1 and rows[9].slide_id in chosen
        assert rows[11].slide_id in chosen
        # Every tissue type, the one-slide type too.
        shown = np.stack([by_id[s].types for s in chosen if by_id[s].status == "ok"]).max(0)
        assert (shown >= 0.02).all(), np.flatnonzero(shown < 0.02)
        assert rows[n // 2].slide_id in chosen


def test_selection_with_more_types_than_images_still_bounded():
    rows = _cohort(500, k=100)
    chosen = select_slides(rows, max_slides=10)
    assert len(chosen) == 10
    # Greedy cover: ten slides of three types each show close to 30 types.
    shown = np.stack([r.types for r in rows if r.slide_id in chosen]).max(0)
    assert (shown >= 0.02).sum() >= 25


def test_table_and_images_from_real_stores(tmp_path, cmu_slide):
    tiles, qc = tmp_path / "good.zarr", tmp_path / "qc"
    r = run_cli("tile", cmu_slide, tiles, "--slide-id", "good", "--mpp", "2", "--tile-size", "128", "--qc-dir", qc)
    assert r.returncode == 0, r.stderr
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"\x00" * 4096)
    assert run_cli("tile", junk, tmp_path / "bad.zarr", "--slide-id", "bad", "--on-error", "skip").returncode == 0
    labels = np.zeros((1, 30, 40), np.uint16)
    labels[0, :10, :20] = 1
    labels[0, 10:, :] = 3  # types 0 and 2 of k = 3
    write_map_store(tmp_path / "good_map.zarr", labels, 64.0, {"slide_id": "good", "source": "kmeans", "num_labels": 4})
    Image.fromarray(np.full((1500, 1200, 3), 200, np.uint8)).save(tmp_path / "good_map.png")
    rows = read_rows([str(tiles), str(tmp_path / "bad.zarr")], [str(tmp_path / "good_map.zarr"), str(tmp_path / "none.zarr")],
                     [str(qc), str(tmp_path / "qc_bad")])
    good, bad = rows
    assert (good.status, bad.status) == ("ok", "failed") and good.n_tiles > 0
    assert 0.1 < good.tissue_mm2 < 2220 * 2967 * 0.499**2 / 1e6  # some, not all, of the slide
    assert np.allclose(good.types, [0.2, 0, 0.8]) and bad.types.tolist() == [0, 0, 0]
    assert "unsupported or corrupt" in bad.reason
    chosen = select_slides(rows, 5)
    assert set(chosen) == {"good", "bad"}
    write_tsv(rows, chosen, tmp_path / "slides.tsv")
    write_html(rows, chosen, tmp_path / "slides.html")
    lines = (tmp_path / "slides.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    first = dict(zip(head, lines[1].split("\t"), strict=True))
    assert first["map_png"] == str(tmp_path / "good_map.png") and first["top_types"] == "t2:80% t0:20%"
    assert "oninput" in (tmp_path / "slides.html").read_text()
    # The chosen slide with a map gets a downscaled copy; the unreadable one has no image.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "old.png").write_bytes(b"from an earlier selection")
    assert write_selected_images(rows, chosen, tmp_path / "images", 400) == 1
    assert Image.open(tmp_path / "images" / "good.png").size == (320, 400)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["good.png"]


def test_qc_flags_ink_blur_and_stain_outliers(tmp_path, cmu_image):
    import cv2

    from histopipe.pyramid import write_pyramid
    from histopipe.tiling import tile_slide

    # Real tissue with a blue pen stroke, and one with a blurred right half.
    inked = cmu_image.copy()
    cv2.line(inked, (100, 300), (2100, 900), (40, 70, 190), 110)
    blurred = cmu_image.copy()
    blurred[:, 1110:] = cv2.GaussianBlur(cmu_image, (0, 0), 6)[:, 1110:]
    stores = []
    for name, img in (("inked", inked), ("blurred", blurred)):
        path = write_pyramid(tmp_path / f"{name}.tiff", img, 0.499, levels=(1, 4, 16))
        tile_slide(path, tmp_path / f"{name}.zarr", name)
        stores.append(str(tmp_path / f"{name}.zarr"))
    rows = read_rows(stores, [str(tmp_path / "none.zarr")] * 2, [str(tmp_path)] * 2)
    inked_row, blurred_row = rows
    assert inked_row.flags == ["ink"] and inked_row.ink_mm2 > 0.05 and inked_row.n_blurry == 0
    assert blurred_row.flags == ["blurry"] and blurred_row.ink_mm2 == 0 and blurred_row.n_blurry > 0.3 * blurred_row.n_tiles
    # Stain statistics: one slide far bluer than a cohort of H&E slides.
    rng = np.random.default_rng(0)
    cohort = [_row(i, np.ones(3) / 3) for i in range(40)]
    for r in cohort:
        r.stain = {"stain_hue": float(rng.normal(312, 4)), "stain_saturation": float(rng.normal(0.32, 0.02)),
                   "stain_value": float(rng.normal(0.7, 0.02))}
    cohort[5].stain["stain_hue"] = 250.0
    flag_outliers(cohort)
    assert [r.slide_id for r in cohort if r.flags] == ["s00005"] and cohort[5].flags == ["stain_hue_low"]
    assert select_slides(cohort, 4)["s00005"] == "outlier (stain_hue_low)"
