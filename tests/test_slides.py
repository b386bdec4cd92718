import numpy as np
import pytest

from histopipe.errors import SlideError
from histopipe.pyramid import write_pyramid
from histopipe.slides import OpenSlideReader, TiffSlideReader, open_slide


def test_real_slide_properties(cmu_slide):
    with open_slide(cmu_slide) as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        info = s.info()
        assert info["width"] == 2220 and info["height"] == 2967 and info["level_downsamples"] == [1.0]


@pytest.mark.parametrize("loc, size", [((1000, 1200), (256, 256)), ((1203, 1801), (333, 251)), ((1500, 600), (256, 256))])
def test_backends_return_identical_pixels_on_real_slide(cmu_slide, loc, size):
    with OpenSlideReader(cmu_slide) as a, TiffSlideReader(cmu_slide) as b:
        pa, pb = a.read_region(loc, 0, size), b.read_region(loc, 0, size)
    assert pa.dtype == np.uint8 and pa.shape == (size[1], size[0], 3)
    assert pa.std() > 10  # real tissue, not a blank read
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("layout, expect_auto", [("aperio", "openslide"), ("generic", "openslide"), ("subifd", "tiffslide")])
def test_generated_pyramids_levels_and_auto_backend(tmp_path, cmu_image, layout, expect_auto):
    img = np.concatenate([cmu_image[:2048, :2048], cmu_image[:2048, :2048][:, ::-1]], axis=1)  # 4096 x 2048
    path = write_pyramid(tmp_path / f"{layout}.tiff", img, 0.25, layout=layout, levels=(1, 4))
    with open_slide(path) as s:
        assert s.backend == expect_auto
        assert s.level_count == 2
        assert s.dimensions == (4096, 2048)
        assert s.level_downsamples[1] == pytest.approx(4.0)
        assert s.mpp == pytest.approx(0.25)
        lvl1 = s.read_region((1024, 512), 1, (128, 96))
    with TiffSlideReader(path) as t:
        np.testing.assert_array_equal(t.read_region((1024, 512), 1, (128, 96)), lvl1)
        full = t.read_region((300, 200), 0, (200, 100))
    # JPEG q90 of the same pixels: close to the source image.
    assert np.abs(full.astype(int) - img[200:300, 300:500]).mean() < 6


def test_mpp_override_and_missing_mpp(tmp_path, cmu_image):
    path = write_pyramid(tmp_path / "nompp.tiff", cmu_image[:1024, :1024], None, layout="generic", levels=(1,))
    with open_slide(path) as s:
        assert s.metadata_mpp is None
        with pytest.raises(SlideError, match=r"nompp\.tiff: no µm/px .*mpp"):
            _ = s.mpp
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.info()["mpp_source"] == "sheet"


def test_unsupported_and_corrupt_files(tmp_path, cmu_slide):
    txt = tmp_path / "notes.svs"
    txt.write_text("not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs: unsupported or corrupt"):
        open_slide(txt)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_slide.read_bytes()[:200_000])
    with pytest.raises(SlideError, match=r"truncated\.svs"):
        with open_slide(truncated) as s:
            s.read_region((0, 0), 0, s.dimensions)
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "absent.svs")
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(cmu_slide, backend="bioformats")


def test_stripped_tiff_is_read_by_tiffslide(tmp_path, cmu_image):
    import tifffile

    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, cmu_image[:512, :512], photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.backend == "tiffslide"
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (64, 32)), cmu_image[20:52, 10:74])
