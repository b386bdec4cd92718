"""The real workflow on a real single-node SLURM cluster, through ``profiles/slurm``.

Starts munged, slurmctld and slurmd (Debian packages, installed if missing; see
tests/slurm_cluster.py), builds the demo cohort, runs Snakemake with the SLURM profile
(plus the test overrides in tests/profiles/slurm-test) on tiling, embedding and a GPU
rule, then checks the outputs and that every job went through SLURM: the cluster's
job-completion log lists each job, completed, and the GPU rule's job held the (fake) GPU.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml
import zarr

from histopipe import paths
from histopipe.sheet import read_sheet
from tests.helpers import ROOT
from tests.slurm_cluster import ClusterError, SlurmCluster, run_bounded, unsupported_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1200)]

TEST_OVERRIDES = ROOT / "tests" / "profiles" / "slurm-test" / "config.yaml"
SNAKEMAKE_TIMEOUT_S = 420
TILING = "mpp0.5_px256"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """A running single-node cluster; stopped (daemons by PID, /etc/slurm restored) after."""
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterError as err:
        pytest.fail(f"could not start the SLURM test cluster: {err}", pytrace=False)
    yield cluster
    cluster.stop()


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied; nested mappings are merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_test_profile(dest: Path, cpus: int) -> Path:
    """The real SLURM profile with the test overrides, as a profile folder ``dest``."""
    real = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    cfg = merge(real, yaml.safe_load(TEST_OVERRIDES.read_text()))
    # Rules asking for more threads than the node has would be refused by sbatch.
    cfg["cores"] = cpus
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def slurm_logs(workdir: Path) -> dict[int, str]:
    """SLURM job id -> rule or group name, from the plugin's per-job log files."""
    found = {}
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        name = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0]
        found[int(log.stem)] = name
    return found


def scontrol_job(job_id: int) -> dict[str, str]:
    """``scontrol show job`` fields (finished jobs stay listed for MinJobAge seconds)."""
    out = run_bounded(["scontrol", "show", "job", "-o", str(job_id)], 10, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def test_workflow_runs_through_slurm(slurm_cluster, tmp_path):
    demo = tmp_path / "demo"
    r = run_bounded([sys.executable, "-m", "histopipe", "demo-cohort", str(demo)], 300)
    assert r.returncode == 0, r.stdout[-3000:]
    sheet = demo / "slides.tsv"
    slides = [e.slide_id for e in read_sheet(sheet)]
    workdir = tmp_path / "work"
    results = workdir / "results"
    profile = write_test_profile(tmp_path / "profile", slurm_cluster.cpus)
    targets = [
        *(paths.TILES.format(results=results, tiling=TILING, slide=s) for s in slides),
        paths.TILING_SUMMARY.format(results=results, tiling=TILING),
    ]
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
        "--profile", str(profile), "--configfile", str(ROOT / "config" / "config.yaml"),
        "--config", f"sheet={sheet}", f"results={results}", "--", *targets,
    ]
    # The jobs inherit this environment (sbatch --export=ALL): conftest put this checkout
    # on PYTHONPATH and the interpreter's scripts first on PATH.
    assert str(ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)
    try:
        run = run_bounded(cmd, SNAKEMAKE_TIMEOUT_S)
    except ClusterError as err:
        pytest.fail(f"{err}\n{slurm_cluster.log_tails()}", pytrace=False)
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{_failed_job_logs(workdir)}\n{slurm_cluster.log_tails()}"

    # Outputs: one valid tile store per slide, and the tiling summary.
    for slide in slides:
        store = zarr.open_group(paths.TILES.format(results=results, tiling=TILING, slide=slide), mode="r")
        assert store.attrs["status"] == "ok" and store.attrs["slide_id"] == slide
        assert store["coords"].shape == (store.attrs["n_tiles"], 2) and store.attrs["n_tiles"] > 0
    summary = Path(paths.TILING_SUMMARY.format(results=results, tiling=TILING)).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in summary[1:]) == sorted(slides)

    # Every job went through SLURM and completed: the plugin's job logs and the
    # cluster's job-completion log name the same job ids.
    submitted = slurm_logs(workdir)
    finished = {j.job_id: j for j in slurm_cluster.jobs() if j.fields.get("WorkDir") == str(workdir)}
    assert submitted and set(submitted) == set(finished), (submitted, finished)
    for job in finished.values():
        assert job.state == "COMPLETED" and job.fields["ExitCode"] == "0:0", job.fields
        assert job.fields["NodeList"] == slurm_cluster.host
    by_name = {}
    for job_id, name in submitted.items():
        by_name.setdefault(name, []).append(job_id)
    # All five slides were tiled by one SLURM job (group tile_batch), not five.
    assert len(by_name.pop("group_tile_batch_tile_slide")) == 1, submitted
    assert len(by_name.pop("rule_collect_failures")) == 1, submitted
    assert not by_name, f"unexpected SLURM jobs: {by_name}"
    for job_id in submitted:
        fields = scontrol_job(job_id)
        assert "gpu" not in fields.get("TresPerJob", "") + fields.get("TresPerNode", ""), fields


def _failed_job_logs(workdir: Path) -> str:
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-3000:]}" for p in logs[-4:])
