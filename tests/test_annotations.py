"""Annotation files -> maps: hand-made Camelyon16/ASAP XML and PANDA-style label masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from histopipe.annotations import annotation_map, read_asap_xml, read_label_mask
from histopipe.errors import HistopipeError
from histopipe.tissuemap import read_map
from tests.helpers import run_cli
from tests.synthetic_stores import grid_coords, write_tile_store

# A 1000 x 800 px slide, 100 px tiles: a 8 x 10 raster. Tiles everywhere except column 9.
W, H, CELL = 1000, 800, 100


@pytest.fixture
def tiles(tmp_path):
    keep = np.ones((8, 10), bool)
    keep[:, 9] = False
    return write_tile_store(tmp_path / "t.zarr", grid_coords(8, 10, CELL, keep=keep), slide_id="s1",
                            width=W, height=H, tile_size=CELL)


def asap_xml(polygons: list[tuple[str, str, list[tuple[float, float]]]], shuffle_order: bool = False) -> str:
    anns = []
    for i, (group, kind, pts) in enumerate(polygons):
        order = list(range(len(pts)))
        if shuffle_order:
            order = order[::-1]
        coords = "".join(f'<Coordinate Order="{o}" X="{pts[o][0]}" Y="{pts[o][1]}" />' for o in order)
        anns.append(f'<Annotation Name="Annotation {i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
                    f"<Coordinates>{coords}</Coordinates></Annotation>")
    return ('<?xml version="1.0"?><ASAP_Annotations><Annotations>' + "".join(anns) + "</Annotations>"
            '<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group></AnnotationGroups>'
            "</ASAP_Annotations>")


def rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_camelyon_xml_tumour_normal_and_exclusion(tiles, tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(asap_xml([
        # tumour: columns 2-5 fully, column 6 at 30 % (stays normal), rows 1-4 fully, row 5 at 70 % (tumour)
        ("_0", "Polygon", rect(200, 100, 630, 570)),
        # non-tumour hole inside it: cell (row 2, col 3)
        ("_2", "Polygon", rect(300, 200, 400, 300)),
        # second tumour group, Camelyon-style "Tumor": cell (row 7, col 9) which has no tile
        ("Tumor", "Spline", rect(900, 700, 1000, 800)),
        ("_1", "Dot", [(50.0, 50.0)]),
    ], shuffle_order=True))
    tmap = annotation_map(xml, tiles)
    expect = np.ones((8, 10), np.uint16)
    expect[:, 9] = 0
    expect[1:6, 2:6] = 2
    expect[2, 3] = 1
    expect[7, 9] = 2
    np.testing.assert_array_equal(tmap.labels[0], expect)
    a = tmap.attrs
    assert tmap.labels.shape == (1, 8, 10) and a["source"] == "annotation"
    assert a["label_names"] == ["background", "normal", "tumor"] and a["num_labels"] == 3 and a["levels"] == [2]
    assert a["cell_level0"] == CELL and a["slide_id"] == "s1"


def test_asap_vertices_follow_their_order(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(asap_xml([("_0", "Polygon", [(0, 0), (10, 0), (10, 5), (0, 5)])], shuffle_order=True))
    (poly,) = read_asap_xml(xml)
    np.testing.assert_array_equal(poly.points, [[0, 0], [10, 0], [10, 5], [0, 5]])
    assert poly.group == "_0"


def test_bad_annotation_files_are_refused(tiles, tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(asap_xml([("Stroma", "Polygon", rect(0, 0, 100, 100))]))
    with pytest.raises(HistopipeError, match="unknown annotation group 'Stroma'"):
        annotation_map(xml, tiles)
    (tmp_path / "b.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(HistopipeError, match="b.xml: not a readable ASAP XML"):
        annotation_map(tmp_path / "b.xml", tiles)
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(HistopipeError, match="unsupported annotation format"):
        annotation_map(tmp_path / "c.json", tiles)
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(HistopipeError, match="aspect ratio"):
        annotation_map(tmp_path / "wide.png", tiles)


def panda_labels(scale: int) -> np.ndarray:
    """Labels of a 1000 x 800 slide at 1/scale: left third 1, a block of 3, a block of 5."""
    lab = np.zeros((H // scale, W // scale), np.uint8)
    lab[:, : 300 // scale] = 1
    lab[200 // scale : 500 // scale, 400 // scale : 700 // scale] = 3
    lab[600 // scale :, 800 // scale :] = 5
    return lab


EXPECT = np.zeros((8, 10), np.uint16)
EXPECT[:, :3] = 1
EXPECT[2:5, 4:7] = 3
EXPECT[6:, 8:] = 5


def test_panda_png_mask_at_a_downsample(tiles, tmp_path):
    rgb = np.stack([panda_labels(4), np.full((200, 250), 7, np.uint8), np.zeros((200, 250), np.uint8)], -1)
    Image.fromarray(rgb).save(tmp_path / "mask.png")  # labels in the first (red) channel
    tmap = annotation_map(tmp_path / "mask.png", tiles, ["background", "stroma", "benign", "g3", "g4", "g5"])
    np.testing.assert_array_equal(tmap.labels[0], EXPECT)
    assert tmap.attrs["num_labels"] == 6 and tmap.attrs["label_names"][3] == "g3"
    auto = annotation_map(tmp_path / "mask.png", tiles)
    assert auto.attrs["label_names"] == ["background", "label 1", "label 2", "label 3", "label 4", "label 5"]


def test_panda_tiff_pyramid_reads_a_small_level(tiles, tmp_path):
    full = np.stack([panda_labels(1)] * 3, -1)
    with tifffile.TiffWriter(tmp_path / "mask.tiff") as tw:  # as PANDA: one page per level
        tw.write(full, tile=(256, 256), photometric="rgb", compression="zlib")
        tw.write(full[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
        tw.write(full[::8, ::8], tile=(16, 16), subfiletype=1, photometric="rgb", compression="zlib")
        tw.write(np.zeros((50, 200, 3), np.uint8), photometric="rgb")  # a label image: other aspect
    assert read_label_mask(tmp_path / "mask.tiff", (8, 10)).shape == (100, 125)
    assert read_label_mask(tmp_path / "mask.tiff", (300, 300)).shape == (400, 500)
    tmap = annotation_map(tmp_path / "mask.tiff", tiles, None)
    np.testing.assert_array_equal(tmap.labels[0], EXPECT)


def test_cli_annotation_map_with_views(cmu_slide, tmp_path):
    # CMU-1-Small-Region geometry, 256 px cells; a tumour square in the middle
    keep = np.ones((12, 9), bool)
    write_tile_store(tmp_path / "t.zarr", grid_coords(12, 9, 256, keep=keep), slide_id="cmu", width=2220,
                     height=2967, tile_size=256, slide_path=cmu_slide, slide_mpp=0.499, target_mpp=0.499)
    (tmp_path / "a.xml").write_text(asap_xml([("_0", "Polygon", rect(512, 512, 1536, 1536))]))
    r = run_cli("annotation-map", cmu_slide, tmp_path / "a.xml", "--tiles", tmp_path / "t.zarr", "--out",
                tmp_path / "m.zarr", "--png", tmp_path / "m.png", "--geojson", tmp_path / "m.geojson", "--max-side", 300)
    assert r.returncode == 0, r.stderr
    tmap = read_map(tmp_path / "m.zarr")
    assert (tmap.labels[0] == 2).sum() == 16 and tmap.attrs["source"] == "annotation"
    from histopipe.maps_io import read_map_store

    assert read_map_store(tmp_path / "m.zarr").label_names == ["background", "normal", "tumor"]
    feats = json.loads((tmp_path / "m.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == ["normal", "tumor"]
    assert Image.open(tmp_path / "m.png").size[1] == 300


def test_polygon_cell_fractions_match_exact_areas(tiles):
    from shapely.geometry import Polygon, box

    from histopipe.annotations import rasterize_polygons
    from histopipe.tissuemap import TileGrid

    t = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    outer = np.stack([500 + 270 * np.cos(t), 400 + 270 * np.sin(t)], 1)
    hole = np.stack([520 + 90 * np.cos(t), 380 + 90 * np.sin(t)], 1)
    frac = rasterize_polygons([outer], [hole], TileGrid.from_tile_store(tiles))
    shape_ = Polygon(outer).difference(Polygon(hole))
    exact = np.array([[shape_.intersection(box(c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)).area / CELL**2
                       for c in range(10)] for r in range(8)])
    assert np.abs(frac - exact).max() < 0.06
    assert abs(frac.sum() - exact.sum()) < 0.01 * exact.sum()  # no bias from boundary samples
