"""``histopipe install-profile``: the repository's profiles under their short names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histopipe.errors import HistopipeError
from histopipe.profiles import PROFILES_DIR, install_profile
from tests.helpers import ROOT


def test_install_links_once_and_again_changes_nothing(tmp_path):
    done = install_profile("slurm", tmp_path / "profiles")
    link = tmp_path / "profiles" / "slurm"
    assert done.action == "linked" and link.is_symlink()
    assert (link / "config.yaml").read_text() == (PROFILES_DIR / "slurm" / "config.yaml").read_text()
    again = install_profile("slurm", tmp_path / "profiles")
    assert again.action == "already" and again.backup is None
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["slurm"]


def test_a_users_own_profile_is_never_overwritten_silently(tmp_path):
    mine = tmp_path / "slurm"
    mine.mkdir()
    (mine / "config.yaml").write_text("executor: slurm\njobs: 7\n")
    with pytest.raises(HistopipeError, match="exists .a folder.*--force"):
        install_profile("slurm", tmp_path)
    assert not mine.is_symlink() and (mine / "config.yaml").read_text().endswith("jobs: 7\n")
    done = install_profile("slurm", tmp_path, force=True)
    assert done.action == "replaced" and done.backup == tmp_path / "slurm.bak1"
    assert (tmp_path / "slurm.bak1" / "config.yaml").read_text().endswith("jobs: 7\n")
    assert (tmp_path / "slurm").resolve() == (PROFILES_DIR / "slurm").resolve()
    # A link elsewhere is someone else's profile too; a second forced install keeps both.
    (tmp_path / "slurm").unlink()
    (tmp_path / "slurm").symlink_to(tmp_path / "slurm.bak1")
    with pytest.raises(HistopipeError, match="a link to"):
        install_profile("slurm", tmp_path)
    assert install_profile("slurm", tmp_path, force=True).backup == tmp_path / "slurm.bak2"


def test_unknown_profile_names_the_known_ones(tmp_path):
    with pytest.raises(HistopipeError, match="local, slurm"):
        install_profile("slurmm", tmp_path)


def test_snakemake_finds_the_installed_profile_by_name(tmp_path, cmu_slide):
    """As users type it: `snakemake --profile slurm` from a folder that has no profiles/."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    work = tmp_path / "work"
    work.mkdir()
    (work / "slides.tsv").write_text(f"slide_id\tpath\ns1\t{cmu_slide}\n")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--profile", "slurm", "--dry-run",
           "--configfile", str(ROOT / "config" / "config.yaml"), "--config", "sheet=slides.tsv", "results=results"]

    def dry_run():
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    before = dry_run()
    assert before.returncode != 0 and "no profile.yaml (or config.yaml) found" in before.stderr
    installed = subprocess.run([sys.executable, "-m", "histopipe", "install-profile"], env=env, capture_output=True,
                               text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "xdg" / "snakemake" / "slurm").resolve() == (PROFILES_DIR / "slurm").resolve()
    after = dry_run()
    out = after.stdout + after.stderr
    assert after.returncode == 0, out[-3000:]
    # The profile's settings were applied: its batching groups appear in the plan.
    assert "Group job tile_batch" in out and "Group job embed_batch" in out, out[-3000:]
    assert not list(Path(work).glob("results/*")), "a dry run wrote outputs"
