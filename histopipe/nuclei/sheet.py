"""The nuclei dataset sheet: one row per labelled nuclei dataset, validated before any work."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from histopipe.config import SCHEMA_DIR, validate
from histopipe.errors import ConfigError

NUCLEI_SHEET_SCHEMA = SCHEMA_DIR / "nuclei_sheet.schema.yaml"
COLUMNS = ("dataset_id", "format", "path", "split", "tissue")


@dataclass(frozen=True)
class NucleiSource:
    """One nuclei dataset: ``path`` absolute, ``split`` train | test | auto, ``tissue`` an
    override of every sample's tissue type (None keeps the dataset's own)."""

    dataset_id: str
    format: str
    path: Path
    split: str = "auto"
    tissue: str | None = None


def read_nuclei_sheet(path: str | Path, check_files: bool = True) -> list[NucleiSource]:
    """Parse and validate a nuclei dataset sheet (TSV with a header row, ``#`` comments).

    Checks the columns, each row against ``nuclei_sheet.schema.yaml``, unique ids and
    (``check_files``) that every dataset folder exists. Messages name the sheet and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: nuclei dataset sheet not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader((line for line in fh if not line.startswith("#")), delimiter="\t"))
    if not rows:
        raise ConfigError(f"{path}: nuclei dataset sheet has no datasets")
    missing = {"dataset_id", "format", "path"} - set(rows[0])
    if missing:
        raise ConfigError(f"{path}: missing column(s) {sorted(missing)} (columns: {', '.join(COLUMNS)})")
    unknown = set(rows[0]) - set(COLUMNS)
    if unknown:
        raise ConfigError(f"{path}: unknown column(s) {sorted(unknown)} (columns: {', '.join(COLUMNS)})")
    base = path.resolve().parent
    out: list[NucleiSource] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows, start=2):
        where = f"{path}:{lineno}"
        if None in row:
            raise ConfigError(f"{where}: more fields than columns")
        record = {k: v.strip() for k, v in row.items() if v is not None and v.strip()}
        did = record.get("dataset_id", "")
        validate(record, NUCLEI_SHEET_SCHEMA, where)
        if did in seen:
            raise ConfigError(f"{where}: duplicate dataset_id {did!r} (first on line {seen[did]})")
        seen[did] = lineno
        folder = Path(record["path"])
        folder = folder if folder.is_absolute() else (base / folder).resolve()
        if check_files and not folder.is_dir():
            raise ConfigError(f"{where}: dataset {did!r}: folder not found: {folder}")
        out.append(NucleiSource(did, record["format"], folder, record["split"], record.get("tissue")))
    return out
