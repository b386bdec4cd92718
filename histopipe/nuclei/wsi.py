"""Unlabeled nuclei patches cut from the WSI cohort (image-only nuclei stores).

The cohort's tile stores (``histopipe.tiling``) already say where the tissue is; this module
picks up to ``nuclei.data.wsi_tiles`` of those tissue tiles per slide and reads, centred on
each, a ``patch_size`` px patch at ``nuclei.data.wsi_mpp`` µm/px: the pyramid level and the
resize are derived from the slide as for the tile grid, so the patches have the physical
scale of the labelled nuclei data whatever the scanner.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from histopipe.nuclei.store import NucleiDataSettings, NucleiStoreWriter
from histopipe.slides import open_slide
from histopipe.tiling import GridPlan, TileStore, TilingConfig, plan_grid

log = logging.getLogger(__name__)


def patch_corners(tile_coords: np.ndarray, tile_l0: float, patch_l0: float, dimensions: tuple[int, int]) -> np.ndarray:
    """Level-0 ``(x, y)`` int64 (N, 2) of patches of side ``patch_l0`` (level-0 px) centred
    on tiles of side ``tile_l0`` at ``tile_coords``, shifted to lie inside the slide."""
    corners = np.asarray(tile_coords, dtype=np.float64).reshape(-1, 2) + (tile_l0 - patch_l0) / 2
    hi = np.maximum(np.asarray(dimensions, dtype=np.float64) - patch_l0, 0)
    return np.clip(np.round(corners), 0, hi).astype(np.int64)


def choose_tiles(n_tiles: int, most: int, seed: int) -> np.ndarray:
    """Indices of up to ``most`` of ``n_tiles`` tiles, seeded, in store order (so reads
    walk the slide in order)."""
    if n_tiles <= most:
        return np.arange(n_tiles)
    return np.sort(np.random.default_rng(seed).choice(n_tiles, size=most, replace=False))


def build_wsi_store(slide_path: str | Path, tile_store: str | Path, out: str | Path, settings: NucleiDataSettings,
                    slide_id: str | None = None, backend: str = "auto", mpp: float | None = None,
                    tissue: str = "unknown") -> Path:
    """Write an image-only nuclei store of up to ``settings.wsi_tiles`` patches of one slide.

    Patches are uint8 (S, S, 3), S = ``settings.patch_size``, at ``settings.wsi_mpp`` µm/px,
    all in split "train" with tissue ``tissue``. The store's attributes record the slide,
    the read level and size, and each patch's level-0 corner (``coords``). A slide coarser
    than ``wsi_mpp`` is an error (SlideError): its patches would be upsampled.
    """
    store = TileStore(tile_store)
    slide_path = Path(slide_path)
    slide_id = slide_id or store.attrs.get("slide_id") or slide_path.stem
    cfg = TilingConfig(mpp=settings.wsi_mpp, tile_size=settings.patch_size)
    with open_slide(slide_path, backend, mpp or store.attrs.get("slide_mpp")) as reader:
        plan: GridPlan = plan_grid(reader.dimensions, reader.level_downsamples, reader.mpp, cfg, str(slide_path))
        tile_l0 = float(store.attrs.get("tile_size_level0", plan.tile_size_level0))
        chosen = choose_tiles(len(store), settings.wsi_tiles, settings.seed)
        corners = patch_corners(store.coords[chosen], tile_l0, plan.tile_size_level0, reader.dimensions)
        attrs = {"slide_id": slide_id, "slide_path": str(slide_path.resolve()), "tile_store": str(Path(tile_store).resolve()),
                 "mpp": settings.wsi_mpp, "slide_mpp": reader.mpp, "read_level": plan.read_level,
                 "read_size": plan.read_size, "patch_size_level0": plan.tile_size_level0,
                 "coords": corners.tolist(), "source": "wsi"}
        with NucleiStoreWriter(out, settings.patch_size, (), labels=False) as writer:
            for x, y in corners.tolist():
                region = reader.read_region((x, y), plan.read_level, (plan.read_size, plan.read_size))
                if plan.needs_resize:
                    region = cv2.resize(region, (plan.tile_size, plan.tile_size), interpolation=cv2.INTER_AREA)
                writer.add_image(region, "train", tissue, f"{slide_id}_x{x}_y{y}", slide_id)
            writer.close(attrs)
    log.info("%s: %d nuclei patches at %g µm/px (level %d, %d px read)", slide_id, len(corners), settings.wsi_mpp,
             plan.read_level, plan.read_size)
    return Path(out)
