"""Whole-slide image readers: one interface, an OpenSlide and a tiffslide backend.

All coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)`` at the level
read. Region reads return ``uint8`` arrays of shape ``(height, width, 3)`` (RGB; transparent
pixels, e.g. outside an MRXS scan, are composited onto white).
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from histopipe.errors import SlideError

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide")


class SlideReader(ABC):
    """A whole-slide image opened for reading."""

    backend: str = ""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_override = mpp
        if not self.path.exists():
            raise SlideError(self.path, "file not found")

    # --- backend-specific -------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]:
        """Raw metadata properties as the backend reports them."""

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Backend read returning RGB or RGBA uint8 ``(h, w, C)``."""

    @abstractmethod
    def close(self) -> None: ...

    # --- common -----------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        return self.properties.get(f"{self.backend}.vendor") or "unknown"

    @cached_property
    def metadata_mpp(self) -> float | None:
        """Level-0 µm/px from the file's metadata, or None when the file carries none."""
        props = self.properties
        values = []
        for axis in ("x", "y"):
            raw = props.get(f"{self.backend}.mpp-{axis}")
            try:
                v = float(raw) if raw not in (None, "") else math.nan
            except ValueError:
                v = math.nan
            if math.isfinite(v) and v > 0:
                values.append(v)
        if not values:
            return None
        if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
            warnings.warn(f"{self.path}: anisotropic pixels (mpp-x {values[0]}, mpp-y {values[1]}); using their mean", stacklevel=2)
        return float(np.mean(values))

    @property
    def mpp(self) -> float:
        """Level-0 resolution in µm/px: the sheet's override, else the metadata."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        mpp = self.metadata_mpp
        if mpp is None:
            raise SlideError(self.path, "no µm/px in the slide's metadata and none given (add an 'mpp' column to the cohort sheet)")
        return mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.0) -> int:
        """Finest-to-coarsest search: the coarsest level whose downsample is ≤ ``downsample``
        (within the relative ``tolerance``), so that reading it never upsamples."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance):
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` = (w, h) pixels at ``level`` starting at level-0 ``location`` = (x, y).

        Returns ``uint8 (h, w, 3)`` RGB. Any decoding failure becomes a SlideError naming
        the file (a truncated or corrupt slide fails here, not with a backend traceback).
        """
        try:
            arr = self._read((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        except SlideError:
            raise
        except Exception as err:  # backends raise many types for corrupt data
            raise SlideError(self.path, f"cannot read region {tuple(location)} level {level} size {tuple(size)}: {err}") from None
        return to_rgb(arr)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of pyramid ``level`` as ``uint8 (h, w, 3)``."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def info(self) -> dict[str, Any]:
        """Slide properties as a JSON-ready dict."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(float(d), 6) for d in self.level_downsamples],
            "mpp": self.mpp if (self._mpp_override is not None or self.metadata_mpp is not None) else None,
            "mpp_source": "sheet" if self._mpp_override is not None else ("metadata" if self.metadata_mpp is not None else None),
            "objective_power": self.properties.get(f"{self.backend}.objective-power"),
        }

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB(A)/grey uint8 array → contiguous RGB, alpha composited onto white."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        if arr[..., 3].min() < 255:
            # OpenSlide returns premultiplied RGBA: background = rgb + (255 - alpha).
            rgb = arr[..., :3].astype(np.uint16) + (255 - arr[..., 3:4].astype(np.uint16))
            arr = np.minimum(rgb, 255).astype(np.uint8)
        else:
            arr = arr[..., :3]  # opaque, the usual case: no arithmetic
    elif arr.shape[2] != 3:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(self.path, "unsupported format (OpenSlide does not recognise this file)") from None
        except openslide.OpenSlideError as err:
            raise SlideError(self.path, f"corrupt or unreadable slide (OpenSlide: {err})") from None

    @property
    def level_dimensions(self):
        return tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)

    @property
    def level_downsamples(self):
        return tuple(float(d) for d in self._slide.level_downsamples)

    @cached_property
    def properties(self):
        return dict(self._slide.properties)

    def _read(self, location, level, size):
        return np.asarray(self._slide.read_region(location, level, size))

    def close(self):
        self._slide.close()


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        import tiffslide

        try:
            self._slide = tiffslide.TiffSlide(str(self.path))
            self._slide.level_dimensions  # noqa: B018  (forces the pyramid to be parsed)
        except Exception as err:
            raise SlideError(self.path, f"unsupported or corrupt file (tiffslide: {type(err).__name__}: {err})") from None

    @property
    def level_dimensions(self):
        return tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)

    @property
    def level_downsamples(self):
        return tuple(float(d) for d in self._slide.level_downsamples)

    @cached_property
    def properties(self):
        return {k: ("" if v is None else str(v)) for k, v in self._slide.properties.items()}

    def _read(self, location, level, size):
        return self._slide.read_region(location, level, size, as_array=True)

    def close(self):
        self._slide.close()


_READERS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader}


def open_slide(path: str | Path, backend: str | None = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide with ``backend`` (``auto``, ``openslide`` or ``tiffslide``).

    ``auto`` uses OpenSlide when it opens the file and sees at least as many pyramid levels
    as tiffslide (OpenSlide misses SubIFD pyramids and refuses stripped TIFFs), else
    tiffslide. ``mpp`` overrides the metadata's level-0 µm/px.
    """
    path = Path(path)
    backend = backend or "auto"
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if backend != "auto":
        if backend not in _READERS:
            raise SlideError(path, f"unknown backend {backend!r} (choose auto, openslide or tiffslide)")
        return _READERS[backend](path, mpp)
    errors = []
    osr = None
    try:
        osr = OpenSlideReader(path, mpp)
    except SlideError as err:
        errors.append(err.problem)
    tsr = None
    if osr is None or _may_hide_levels(osr):
        try:
            tsr = TiffSlideReader(path, mpp)
        except SlideError as err:
            errors.append(err.problem)
    if osr is not None and tsr is not None:
        if tsr.level_count > osr.level_count:
            log.info("%s: tiffslide sees %d levels, OpenSlide %d: using tiffslide", path, tsr.level_count, osr.level_count)
            osr.close()
            return tsr
        tsr.close()
        return osr
    if osr is not None:
        return osr
    if tsr is not None:
        return tsr
    raise SlideError(path, "unsupported or corrupt slide: " + "; ".join(errors))


def _may_hide_levels(reader: OpenSlideReader) -> bool:
    """OpenSlide only misses levels of TIFF-based generic files (SubIFD pyramids)."""
    return reader.properties.get("openslide.vendor") == "generic-tiff" or reader.level_count == 1
