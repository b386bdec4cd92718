"""Machine-readable metric files (JSON and TSV), always written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from histopipe.atomic import atomic_write_text
from histopipe.errors import HistopipeError


def _clean(value):
    # JSON has no NaN: undefined scores (a class absent from the test set) become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HistopipeError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise HistopipeError(f"{path}: not valid JSON ({err})") from None


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def tsv_text(rows: Iterable[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_tsv(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    atomic_write_text(path, tsv_text(rows, columns))
