"""Atomic outputs: write beside the target under a temporary name, then rename.

A run killed at any point leaves either the previous complete output or nothing under the
final name (temporary names start with ``.`` and end in ``.partial``), so Snakemake and a
rerun never take a half-written file for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or folder) to write; on success it replaces ``target``.

    On any exception the temporary output is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = _temp_name(target)
    try:
        yield tmp
        if tmp.is_dir():
            # rename() cannot replace a non-empty folder: move the old one aside first.
            old = None
            if target.exists():
                old = _temp_name(target)
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                _remove(old)
        else:
            if tmp.exists():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Remove temporary outputs for ``target`` left by writers that no longer run."""
    for p in target.parent.glob(f".{target.name}.*.partial"):
        try:
            pid = int(p.name[len(target.name) + 2 :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            _remove(p)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())


def clean_partials(folder: str | Path) -> int:
    """Remove temporary outputs left by killed runs under ``folder``; return how many."""
    n = 0
    for p in Path(folder).rglob(".*.partial"):
        _remove(p)
        n += 1
    return n
