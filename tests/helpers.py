"""Helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``histopipe ARGS`` in a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", "histopipe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def snakemake(workdir: Path, *args, timeout: int = 1200, profile: str = "profiles/local",
              demo: bool = True, extra_configs: tuple = ()) -> subprocess.CompletedProcess:
    """Run the real workflow (this checkout's Snakefile) with ``workdir`` as working directory.

    ``demo`` lays config/demo.yaml (demo-scale cohort settings) and the tiny model preset over
    config/config.yaml.
    """
    demo_configs = [str(ROOT / "config" / "demo.yaml"), str(ROOT / "config" / "presets" / "tiny.yaml")]
    configs = [str(ROOT / "config" / "config.yaml")] + (demo_configs if demo else [])
    configs += [str(c) for c in extra_configs]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--profile", str(ROOT / profile), *map(str, args), "--configfile", *configs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
