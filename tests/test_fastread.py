"""Fast tile reads: same pixels as OpenSlide and tiffslide, level mapping, fallbacks, workers."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import tifffile

from histopipe.demo import _read_full, fetch_cmu_slide
from histopipe.errors import SlideError
from histopipe.fastread import FastReadUnsupported, TiffTiles
from histopipe.pyramid import LAYOUTS, write_pyramid
from histopipe.slides import open_slide
from histopipe.tilepool import bands, map_batches
from histopipe.tiling import TileSource, TilingConfig, tile_slide

# tiffslide warns on every region that reaches past the slide: those are wanted here.
pytestmark = pytest.mark.filterwarnings("ignore:.*out-of-bounds")


@pytest.fixture(scope="module")
def cmu():
    return fetch_cmu_slide()


@pytest.fixture(scope="module")
def tissue(cmu):
    return _read_full(cmu)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, tissue):
    """The real slide's pixels as 0.25 µm/px pyramids of every layout (levels 1/4; level sizes
    are not multiples of 4, so OpenSlide's level downsample is not whole)."""
    folder = tmp_path_factory.mktemp("pyramids")
    return {layout: write_pyramid(folder / f"{layout}.tiff", tissue, 0.25, layout=layout) for layout in LAYOUTS}


def _regions(rng, dims, n=25):
    """Random regions of random sizes, some reaching past the level's edges."""
    w, h = dims
    locs = np.stack([rng.integers(-200, w, n), rng.integers(-200, h, n)], axis=1)
    return locs, (int(rng.integers(40, 600)), int(rng.integers(40, 600)))


def _assert_same_regions(reader, tiles, level, locs, size):
    got = list(tiles.read_regions(locs, level, size))
    for loc, region in zip(locs, got, strict=True):
        expected = reader.read_region(tuple(int(v) for v in loc), level, size)
        assert region.shape == expected.shape and region.dtype == np.uint8
        np.testing.assert_array_equal(region, expected, err_msg=f"{reader.path} {reader.backend} level {level} at {tuple(loc)}")


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_real_slide_regions_identical(cmu, backend):
    # CMU-1: Aperio RGB JPEG with shared JPEGTables and no colour marker, 240² tiles.
    rng = np.random.default_rng(0)
    with open_slide(cmu, backend) as reader, TiffTiles.for_reader(reader) as tiles:
        lv = tiles.level(0)
        assert lv.jpegtables and lv.jpeg_colorspace == "RGB" and lv.tile_w == 240
        locs, size = _regions(rng, reader.dimensions)
        _assert_same_regions(reader, tiles, 0, locs, size)
        assert tiles.verify(reader, 0) is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_generated_pyramid_regions_identical(pyramids, layout, backend):
    rng = np.random.default_rng(1)
    with open_slide(pyramids[layout], backend) as reader, TiffTiles.for_reader(reader) as tiles:
        # Levels are the backend's: OpenSlide sees only level 0 of a SubIFD pyramid.
        assert len(tiles.level_dimensions) == reader.level_count == (1 if (layout, backend) == ("subifd", "openslide") else 2)
        for level in range(reader.level_count):
            lv = tiles.level(level)
            assert (lv.width, lv.height) == reader.level_dimensions[level]
            locs, size = _regions(rng, reader.dimensions)
            if tiles.exact_at(locs, level):
                _assert_same_regions(reader, tiles, level, locs, size)
            else:
                # OpenSlide interpolates a fractional level offset; the fast path says so
                # and reads the nearest pixel instead.
                assert backend == "openslide" and level > 0
            assert tiles.verify(reader, level) is None


def test_openslide_whole_downsample_levels_identical(tmp_path, tissue):
    # Level sizes that divide exactly: OpenSlide's downsample is 4.0, and locations that are
    # multiples of 4 fall on whole level pixels, where the fast path must match it exactly.
    path = write_pyramid(tmp_path / "whole.tiff", tissue[:2048, :2048], 0.25, layout="generic", levels=(1, 4))
    rng = np.random.default_rng(2)
    with open_slide(path, "openslide") as reader, TiffTiles.for_reader(reader) as tiles:
        assert reader.level_downsamples[1] == 4.0
        locs = rng.integers(0, 500, (20, 2)) * 4
        assert tiles.exact_at(locs, 1) and not tiles.exact_at(locs + 1, 1)
        _assert_same_regions(reader, tiles, 1, locs, (300, 200))


@pytest.mark.parametrize("kind", ["ycbcr_jpeg", "zlib"])
def test_other_encodings_identical(tmp_path, tissue, kind):
    # YCbCr 4:2:0 JPEG (tifffile's default) and a non-JPEG codec through tifffile's decoder.
    img = tissue[:1500, :1700]
    path = tmp_path / f"{kind}.tiff"
    if kind == "ycbcr_jpeg":
        write_pyramid(path, img, 0.5, layout="generic", levels=(1,), rgb_jpeg=False)
    else:
        tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None,
                         resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    rng = np.random.default_rng(3)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as reader, TiffTiles.for_reader(reader) as tiles:
            _assert_same_regions(reader, tiles, 0, *_regions(rng, reader.dimensions, 15))


def test_decodes_each_file_tile_once(pyramids):
    # Unaligned overlapping regions in row-major order: every file tile they touch is decoded
    # exactly once per call, and the regions are still right.
    with open_slide(pyramids["aperio"], "tiffslide") as reader, TiffTiles.for_reader(reader) as tiles:
        calls = []
        decode = tiles.decode_tile
        tiles.decode_tile = lambda lv, tx, ty, k=1, out=None: calls.append((tx, ty)) or decode(lv, tx, ty, k, out)
        locs = np.array([(x, y) for y in range(100, 1500, 180) for x in range(70, 1400, 180)])
        _assert_same_regions(reader, tiles, 0, locs, (300, 300))
        assert len(calls) == len(set(calls)) > 0
        # Whole-tile regions, each file tile used twice, written into given destinations.
        locs = np.array([(x, y) for y in (0, 256) for x in (0, 256, 512)] * 2)
        dests = np.zeros((len(locs), 256, 256, 3), dtype=np.uint8)
        calls.clear()
        for dest, region in zip(dests, tiles.read_regions(locs, 0, (256, 256), out=dests), strict=True):
            assert np.shares_memory(region, dest)
        assert len(calls) == 6
        for loc, region in zip(locs, dests, strict=True):
            np.testing.assert_array_equal(region, reader.read_region(tuple(loc), 0, (256, 256)))


def _store(path, out, mpp, backend="auto", overlap=0):
    tile_slide(path, out, tiling=TilingConfig(mpp=mpp, min_tissue=0.0, overlap=overlap), backend=backend)
    return out


@pytest.mark.parametrize(("layout", "mpp", "overlap", "path"), [
    ("aperio", 0.25, 0, "fast"),       # native: level 0, 256 px reads, one file tile each
    ("aperio", 0.25, 128, "fast"),     # overlapping grid: file tiles shared by 4 grid tiles
    ("aperio", 0.5, 0, "fast"),        # downsample 2: level 0, 512 px reads resized to 256
    ("aperio", 1.0, 0, "general"),     # OpenSlide level 1 (downsample 4.0007): sub-pixel offsets
    ("subifd", 1.0, 0, "fast"),        # tiffslide level 1
    ("generic", 1.0, 0, "general"),
])
def test_tile_source_fast_path_identical(pyramids, tmp_path, layout, mpp, overlap, path):
    store = _store(pyramids[layout], tmp_path / "s.zarr", mpp, overlap=overlap)
    general = TileSource(store, fast=False)
    fast = TileSource(store)
    assert general.read_path == "general" and general.fast_reason == "fast=False"
    assert fast.read_path == path, fast.fast_reason
    if path == "general":
        assert "interpolates" in fast.fast_reason
    idx = np.arange(len(fast))
    expected = general.read_batch(idx)
    np.testing.assert_array_equal(fast.read_batch(idx), expected)
    got = np.concatenate([tiles for _, tiles in fast.iter_batches(batch_size=7)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(fast[len(fast) // 2], expected[len(fast) // 2])
    np.testing.assert_array_equal(fast.read_batch(idx[::-3]), expected[::-3])  # any order


def test_tile_source_real_slide(cmu, tmp_path):
    store = _store(cmu, tmp_path / "cmu.zarr", 0.5)
    fast, general = TileSource(store), TileSource(store, fast=False)
    assert fast.read_path == "fast" and len(fast) > 50
    np.testing.assert_array_equal(fast.read_batch(np.arange(len(fast))), general.read_batch(np.arange(len(fast))))


def test_inexact_mode_reduced_dct_decoding(pyramids, tmp_path):
    # exact=False decodes JPEG at half scale when the grid downsamples by 2: a different,
    # equally valid 2× reduction. Bound its distance to the area resize of the full decode.
    store = _store(pyramids["aperio"], tmp_path / "s.zarr", 0.5)
    approx, exact = TileSource(store, exact=False), TileSource(store)
    assert approx.read_path == "fast" and approx.decode_reduce == 2 and exact.decode_reduce == 1
    idx = np.arange(len(exact))
    diff = np.abs(approx.read_batch(idx).astype(np.int16) - exact.read_batch(idx))
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 4 and diff.max() <= 16


def test_inexact_mode_nearest_pixel_on_openslide_levels(pyramids, tmp_path):
    store = _store(pyramids["aperio"], tmp_path / "s.zarr", 1.0, backend="openslide")
    approx, exact = TileSource(store, exact=False), TileSource(store)
    assert approx.read_path == "fast" and exact.read_path == "general"
    idx = np.arange(len(exact))
    diff = np.abs(approx.read_batch(idx).astype(np.int16) - exact.read_batch(idx))
    assert diff.mean() < 4  # a shift of under half a pixel


def test_unsupported_files_fall_back(tmp_path, tissue):
    img = tissue[:1024, :1024]
    strips = tmp_path / "stripped.tiff"
    tifffile.imwrite(strips, img, photometric="rgb", compression="zlib", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(strips) as reader:
        assert reader.backend == "tiffslide"  # OpenSlide refuses stripped TIFFs
        with pytest.raises(FastReadUnsupported, match="strips"):
            TiffTiles.for_reader(reader)
    store = _store(strips, tmp_path / "s.zarr", 0.5)
    source = TileSource(store)
    assert source.read_path == "general" and "strips" in source.fast_reason
    assert source.read_batch([0, 1]).shape == (2, 256, 256, 3)

    png = tmp_path / "tile.png"
    cv2.imwrite(str(png), img)
    with pytest.raises(FastReadUnsupported, match="not a readable TIFF"):
        TiffTiles(png, "tiffslide", [(1024, 1024)], [1.0])
    with pytest.raises(FastReadUnsupported, match="no fast path"):
        TiffTiles(strips, "bioformats", [(1024, 1024)], [1.0])


def test_unsupported_vendor_and_missing_level(pyramids):
    with open_slide(pyramids["generic"], "openslide") as reader:
        reader.properties["openslide.vendor"] = "ventana"  # BIF: overlapping tiles
        with pytest.raises(FastReadUnsupported, match="vendor 'ventana'"):
            TiffTiles.for_reader(reader)
    with TiffTiles(pyramids["generic"], "tiffslide", [(2220, 2967), (999, 999)], [1.0, 2.0]) as tiles:
        assert tiles.level(0).width == 2220
        with pytest.raises(FastReadUnsupported, match="no page of 999×999"):
            tiles.level(1)
    with pytest.raises(FastReadUnsupported, match="level 0: no page"):
        TiffTiles(pyramids["generic"], "tiffslide", [(999, 999)], [1.0])


def _sums(indices, tiles):
    return indices.copy(), tiles.reshape(len(tiles), -1).sum(axis=1)


def test_pickled_source_in_two_worker_processes(pyramids, tmp_path):
    store = _store(pyramids["aperio"], tmp_path / "s.zarr", 0.5)
    source = TileSource(store)
    source.read_batch([0])  # opened here: pickling must not carry the open slide
    clone = pickle.loads(pickle.dumps(source))
    assert clone._tiles is None and clone._reader is None
    assert [len(b) for b in bands(10, 3)] == [3, 4, 3] and bands(0, 2) == []
    one = map_batches(source, _sums, workers=1, batch_size=16)
    two = map_batches(source, _sums, workers=2, batch_size=16)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in two]), np.arange(len(source)))
    np.testing.assert_array_equal(np.concatenate([s for _, s in two]), np.concatenate([s for _, s in one]))
    expected = source.read_batch(np.arange(len(source))).reshape(len(source), -1).sum(axis=1)
    np.testing.assert_array_equal(np.concatenate([s for _, s in one]), expected)


def test_torch_dataloader_workers_in_order(pyramids, tmp_path):
    torch = pytest.importorskip("torch")
    store = _store(pyramids["generic"], tmp_path / "s.zarr", 0.5)
    source = TileSource(store)
    expected = source.read_batch(np.arange(len(source)))  # the parent has the slide open
    loader = torch.utils.data.DataLoader(source, batch_size=8, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_corrupt_tile_names_the_file(pyramids, tmp_path):
    path = tmp_path / "corrupt.tiff"
    path.write_bytes(pyramids["generic"].read_bytes())
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
    with open_slide(path, "tiffslide") as reader, TiffTiles.for_reader(reader) as tiles:
        with pytest.raises(SlideError, match=r"corrupt\.tiff: cannot decode tile \(5, 0\)"):
            tiles.read_region((5 * 256, 0), 0, (256, 256))
        assert tiles.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)
