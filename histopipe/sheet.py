"""The cohort sheet: one row per slide, validated before any work starts."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from histopipe.config import SHEET_SCHEMA, validate
from histopipe.errors import ConfigError

OPTIONAL_COLUMNS = ("mpp", "backend", "annotation")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort. ``path`` is absolute; ``mpp`` overrides the metadata (µm/px)."""

    slide_id: str
    path: Path
    mpp: float | None = None
    backend: str | None = None
    annotation: Path | None = None


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def read_sheet(path: str | Path, check_files: bool = True) -> list[SlideEntry]:
    """Parse and validate a cohort sheet (TSV with a header row).

    Checks: required columns, slide-id syntax, unique ids, numeric positive ``mpp``, known
    backends and (``check_files``) that every slide and annotation file exists and is a
    non-empty file. Every message names the sheet, the row and the slide.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cohort sheet not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader((line for line in fh if not line.startswith("#")), delimiter="\t"))
    if not rows:
        raise ConfigError(f"{path}: cohort sheet has no slides")
    missing = {"slide_id", "path"} - set(rows[0])
    if missing:
        raise ConfigError(f"{path}: missing column(s) {sorted(missing)} (columns: slide_id, path, optional {', '.join(OPTIONAL_COLUMNS)})")
    base = path.resolve().parent
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows, start=2):
        where = f"{path}:{lineno}"
        record: dict = {k: _clean(v) for k, v in row.items() if k is not None}
        sid = record.get("slide_id") or ""
        if record.get("mpp") is not None:
            try:
                record["mpp"] = float(record["mpp"])
            except ValueError:
                raise ConfigError(f"{where}: slide {sid!r}: mpp {record['mpp']!r} is not a number") from None
            if not math.isfinite(record["mpp"]):
                raise ConfigError(f"{where}: slide {sid!r}: mpp must be a finite number")
        record = {k: v for k, v in record.items() if k in ("slide_id", "path", *OPTIONAL_COLUMNS)}
        try:
            validate(record, SHEET_SCHEMA, where)
        except ConfigError as err:
            raise ConfigError(f"{err} (slide {sid!r})") from None
        if sid in seen:
            raise ConfigError(f"{where}: duplicate slide_id {sid!r} (first on line {seen[sid]})")
        seen[sid] = lineno
        slide_path = (base / record["path"]).resolve() if not Path(record["path"]).is_absolute() else Path(record["path"])
        annotation = record.get("annotation")
        ann_path = None
        if annotation:
            ann_path = Path(annotation) if Path(annotation).is_absolute() else (base / annotation).resolve()
        if check_files:
            _check_file(slide_path, f"{where}: slide {sid!r}")
            if ann_path is not None:
                _check_file(ann_path, f"{where}: annotation of slide {sid!r}")
        backend = record.get("backend")
        entries.append(SlideEntry(sid, slide_path, record.get("mpp"), None if backend == "auto" else backend, ann_path))
    return entries


def _check_file(path: Path, what: str) -> None:
    # MRXS slides keep their data in a sibling folder; the index file itself must exist.
    if not path.exists():
        raise ConfigError(f"{what}: file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{what}: is a folder, not a slide file: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{what}: file is empty: {path}")


def write_sheet(entries: list[SlideEntry], path: str | Path, relative_to: Path | None = None) -> None:
    """Write a sheet; paths are written relative to ``relative_to`` (default: the sheet's folder)."""
    path = Path(path)
    base = (relative_to or path.parent).resolve()
    lines = ["slide_id\tpath\tmpp\tbackend\tannotation"]
    for e in entries:
        p = Path(e.path).resolve()
        try:
            shown = p.relative_to(base)
        except ValueError:
            shown = p
        ann = ""
        if e.annotation:
            a = Path(e.annotation).resolve()
            try:
                ann = str(a.relative_to(base))
            except ValueError:
                ann = str(a)
        lines.append(f"{e.slide_id}\t{shown}\t{'' if e.mpp is None else e.mpp}\t{e.backend or ''}\t{ann}")
    path.parent.mkdir(parents=True, exist_ok=True)
    from histopipe.atomic import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")
