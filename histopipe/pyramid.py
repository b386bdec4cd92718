"""Writing pyramidal TIFF slides with tifffile (demo cohorts, tests, benchmarks).

Three layouts, read differently by the backends:

- ``aperio``: Aperio SVS layout (description with ``AppMag``/``MPP``, stripped thumbnail as
  the second page, reduced levels as plain pages). OpenSlide reads it as ``aperio``.
- ``generic``: a tiled TIFF whose reduced levels are pages with ``subfiletype=1`` and
  resolution tags. OpenSlide reads it as ``generic-tiff`` with all levels.
- ``subifd``: reduced levels as SubIFDs (OME-TIFF style). tiffslide sees all levels,
  OpenSlide only level 0, so ``auto`` picks tiffslide.

JPEG tiles are RGB without chroma subsampling by default, as Aperio scanners write them
(YCbCr 4:2:0 decodes about twice as fast and would flatter reader benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from histopipe.atomic import atomic_path

LAYOUTS = ("aperio", "generic", "subifd")


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)


def write_pyramid(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    layout: str = "generic",
    levels: tuple[int, ...] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
    rgb_jpeg: bool = True,
    magnification: float | None = None,
) -> Path:
    """Write ``image`` (uint8 ``(h, w, 3)``) as a pyramidal tiled JPEG TIFF at level-0 ``mpp``.

    ``levels`` are downsample factors (first must be 1); levels smaller than one tile are
    dropped. ``mpp=None`` writes no resolution metadata (a slide without µm/px).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    h, w = image.shape[:2]
    levels = tuple(f for f in levels if f == 1 or min(h, w) // f >= tile)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    if rgb_jpeg:
        jpeg["compressionargs"]["outcolorspace"] = "RGB"
        jpeg["subsampling"] = (1, 1)
    mag = magnification or (round(10.0 / mpp) if mpp else 20)

    def res(factor: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * factor), 1e4 / (mpp * factor)), "resolutionunit": "CENTIMETER"}

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        if layout == "aperio":
            desc = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {mag:g}"
            if mpp is not None:
                desc += f"|MPP = {mpp:.6g}"
            tif.write(image, tile=(tile, tile), photometric="rgb", description=desc, metadata=None, **jpeg, **res(1))
            thumb = downsample(image, max(1, max(h, w) // 768))
            tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None, description="Aperio Image Library v12.0.15\r\nthumbnail")
            for f in levels[1:]:
                lvl = downsample(image, f)
                tif.write(lvl, tile=(tile, tile), photometric="rgb", metadata=None,
                          description=f"Aperio Image Library v12.0.15\r\n{w}x{h} -> {lvl.shape[1]}x{lvl.shape[0]} JPEG/RGB Q={quality}", **jpeg)
        elif layout == "generic":
            tif.write(image, tile=(tile, tile), photometric="rgb", metadata=None, description="histopipe generic pyramid", **jpeg, **res(1))
            for f in levels[1:]:
                tif.write(downsample(image, f), tile=(tile, tile), photometric="rgb", subfiletype=1, metadata=None, **jpeg, **res(f))
        else:
            tif.write(image, tile=(tile, tile), photometric="rgb", subifds=len(levels) - 1, metadata=None,
                      description="histopipe subifd pyramid", **jpeg, **res(1))
            for f in levels[1:]:
                tif.write(downsample(image, f), tile=(tile, tile), photometric="rgb", subfiletype=1, metadata=None, **jpeg, **res(f))
    return path
