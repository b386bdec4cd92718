"""Cohort-level quality-control tables."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import zarr

from histopipe.atomic import atomic_write_text

log = logging.getLogger(__name__)


def write_tiling_summary(stores: Iterable[str | Path], failed_out: str | Path, summary_out: str | Path) -> int:
    """Write ``failed_slides.tsv`` (slide, path, reason) and a per-slide tiling summary (with
    the slide QC: pen-ink area in mm², blurry tiles).

    Returns the number of failed slides. Reads only the stores' attributes.
    """
    failed = ["slide_id\tslide_path\treason"]
    keys = ("slide_id", "status", "n_tiles", "slide_mpp", "read_level", "backend", "ink_area_mm2", "n_blurry")
    summary = ["\t".join(keys) + "\treason"]
    n_failed = 0
    for store in stores:
        a = dict(zarr.open_group(str(store), mode="r").attrs)
        status = a.get("status", "ok")
        reason = " ".join(str(a.get("reason", "")).split())
        if status == "failed":
            n_failed += 1
            failed.append(f"{a.get('slide_id')}\t{a.get('slide_path')}\t{reason}")
        summary.append("\t".join(str(a.get(k, "")) for k in keys) + f"\t{reason}")
    atomic_write_text(failed_out, "\n".join(failed) + "\n")
    atomic_write_text(summary_out, "\n".join(summary) + "\n")
    if n_failed:
        log.warning("%d slide(s) failed and were skipped; see %s", n_failed, failed_out)
    return n_failed
