"""Shared fixtures: the real slide, generated pyramids and the demo cohort."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Subprocesses (the CLI, Snakemake and its jobs) import this checkout's package and find the
# interpreter's scripts (histopipe, snakemake) first on PATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss on one OpenMP thread for a module's tests (tiny problems on a shared 2-core
    machine: more threads only add waiting)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real Aperio slide CMU-1-Small-Region (cached after the first fetch)."""
    from histopipe.demo import fetch_cmu_slide

    return fetch_cmu_slide()


@pytest.fixture(scope="session")
def cmu_image(cmu_slide) -> np.ndarray:
    """Level 0 of the real slide as uint8 (2967, 2220, 3)."""
    from histopipe.slides import open_slide

    with open_slide(cmu_slide, "openslide") as s:
        return s.read_level(0)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """The demo cohort written once per session; returns its sheet."""
    from histopipe.demo import build_demo_cohort

    return build_demo_cohort(tmp_path_factory.mktemp("demo"))
