"""The real workflow on a real single-node SLURM cluster, through ``profiles/slurm``.

Starts munged, slurmctld and slurmd (Debian packages, installed if missing; see
tests/slurm_cluster.py), takes two slides of the demo cohort, runs Snakemake with the
SLURM profile as users type it (``--profile slurm``, installed by ``histopipe
install-profile`` into a temporary Snakemake profile folder, plus the test overrides in
tests/profiles/slurm-test) through tiling and embedding (``embed_tiles`` is a GPU rule), then
checks the outputs and that every job went through SLURM: the cluster's job-completion log
lists each job, completed; each stage ran as one batch job; only the embedding job held the
(fake) GPU.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from histopipe import paths
from histopipe.config import deep_merge, load_config
from histopipe.sheet import read_sheet
from histopipe.workflow import Cohort
from tests.helpers import ROOT
from tests.slurm_cluster import ClusterError, SlurmCluster, run_bounded, unsupported_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1200)]

TEST_OVERRIDES = ROOT / "tests" / "profiles" / "slurm-test" / "config.yaml"
SNAKEMAKE_TIMEOUT_S = 420
CONFIG = ROOT / "config" / "config.yaml"
SLIDES = ("cmu1_small_region", "cmu1_subifd")


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


def install_slurm_profile(config_home: Path) -> dict[str, str]:
    """``histopipe install-profile`` into ``config_home``; the environment in which
    ``snakemake --profile slurm`` finds it there (Snakemake honours XDG_CONFIG_HOME)."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    done = run_bounded([sys.executable, "-m", "histopipe", "install-profile"], 60, env=env)
    assert done.returncode == 0, done.stdout
    assert (config_home / "snakemake" / "slurm").resolve() == (ROOT / "profiles" / "slurm").resolve()
    return env


def write_test_overrides(dest: Path, cpus: int) -> Path:
    """The test overrides as a second profile folder ``dest``, given after ``--profile slurm``.

    Snakemake merges profiles by top-level key, so a mapping the tests override in part
    (default-resources) is written whole: the real profile's keys with the test's over them.
    """
    real = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    over = yaml.safe_load(TEST_OVERRIDES.read_text())
    cfg = {k: deep_merge(real[k], v) if isinstance(v, dict) and isinstance(real.get(k), dict) else v
           for k, v in over.items()}
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


def rule_resources(log: str, rule: str) -> list[dict[str, str]]:
    """The ``resources:`` Snakemake printed for each job of ``rule`` in ``log``."""
    blocks = re.findall(rf"rule {rule}:\n(?:.*\n)*?\s+resources: (.*)", log)
    return [dict(kv.split("=", 1) for kv in b.split(", ") if "=" in kv) for b in blocks]


def scontrol_job(job_id: int) -> dict[str, str]:
    """``scontrol show job`` fields (finished jobs stay listed for MinJobAge seconds)."""
    out = run_bounded(["scontrol", "show", "job", "-o", str(job_id)], 10, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _sub_cohort(demo_sheet: Path, dest: Path, ids: tuple[str, ...]) -> Path:
    dest.mkdir(parents=True)
    rows = [f"{e.slide_id}\t{e.path}" for e in read_sheet(demo_sheet) if e.slide_id in ids]
    assert len(rows) == len(ids), f"demo cohort lacks one of {ids}"
    (dest / "slides.tsv").write_text("slide_id\tpath\n" + "\n".join(rows) + "\n")
    return dest / "slides.tsv"


def _snakemake(overrides: Path, env: dict[str, str], workdir: Path, sheet: Path, results: Path, targets: list[str]):
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
        "--profile", "slurm", "--profile", str(overrides), "--configfile", str(CONFIG),
        "--config", f"sheet={sheet}", f"results={results}", "--", *targets,
    ]
    try:
        # From a folder without a `slurm` subfolder: the name resolves only where
        # install-profile put it.
        return run_bounded(cmd, SNAKEMAKE_TIMEOUT_S, env=env, cwd=workdir.parent)
    except ClusterError as err:  # timed out: say where it stood
        pytest.fail(f"{err}\n{_job_logs(workdir)}", pytrace=False)


def test_workflow_runs_through_slurm(slurm_cluster, demo_cohort, tmp_path):
    # Two slides (one per reader backend) keep the run short; batching shows with two.
    sheet = _sub_cohort(demo_cohort, tmp_path / "cohort", SLIDES)
    workdir = tmp_path / "work"
    results = workdir / "results"
    env = install_slurm_profile(tmp_path / "config_home")
    overrides = write_test_overrides(tmp_path / "overrides", slurm_cluster.cpus)
    cohort = Cohort(read_sheet(sheet), load_config(CONFIG, {"sheet": str(sheet), "results": str(results)}))
    assert sorted(cohort.slide_ids) == sorted(SLIDES)
    tiles = dict(zip(cohort.slide_ids, map(Path, cohort.tile_stores()), strict=True))
    embeddings = dict(zip(cohort.slide_ids, map(Path, cohort.embedding_stores()), strict=True))
    summary = Path(paths.TILING_SUMMARY.format(results=results, tiling=cohort.tiling_id))
    samples = dict(zip(cohort.slide_ids, map(Path, cohort.cluster_samples()), strict=True))
    batches = cohort.cluster_sample_batches()
    assert len(batches) == 1  # both slides in one batch rule job
    targets = [*map(str, tiles.values()), *map(str, embeddings.values()), str(summary), *batches]
    # The jobs inherit this environment (sbatch --export=ALL): conftest put this checkout
    # on PYTHONPATH and the interpreter's scripts first on PATH.
    assert str(ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)

    run = _snakemake(overrides, env, workdir, sheet, results, targets)
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{_job_logs(workdir)}\n{slurm_cluster.log_tails()}"

    # Outputs: a tile store and an embedding store per slide, and the tiling summary.
    for slide in SLIDES:
        store = zarr.open_group(tiles[slide], mode="r")
        n = store.attrs["n_tiles"]
        assert store.attrs["status"] == "ok" and store.attrs["slide_id"] == slide and n > 0
        emb = zarr.open_group(embeddings[slide], mode="r")
        assert emb.attrs["encoder"] == cohort.encoder and emb.attrs["n_tiles"] == n
        assert emb["features"].shape == (n, emb.attrs["dim"])
        assert (emb["coords"][:] == store["coords"][:]).all()
        features = emb["features"][:].astype("float32")
        assert np.isfinite(features).all() and features.std() > 0
        sample = zarr.open_group(samples[slide], mode="r")
        assert 0 < sample["features"].shape[0] <= n
    rows = summary.read_text().splitlines()[1:]
    assert sorted(row.split("\t")[0] for row in rows) == sorted(SLIDES)

    # Every job went through SLURM and completed: the plugin's job logs and the
    # cluster's job-completion log name the same job ids.
    submitted = slurm_logs(workdir)
    finished = {j.job_id: j for j in slurm_cluster.jobs() if j.fields.get("WorkDir") == str(workdir)}
    assert submitted and set(submitted) == set(finished), (submitted, finished)
    for job in finished.values():
        assert job.state == "COMPLETED" and job.fields["ExitCode"] == "0:0", job.fields
        assert job.fields["NodeList"] == slurm_cluster.host
    by_name: dict[str, list[int]] = {}
    for job_id, name in submitted.items():
        by_name.setdefault(name, []).append(job_id)
    # Each per-slide stage ran as one SLURM job for both slides (a group or a batch rule),
    # not one per slide.
    assert sorted(by_name) == ["group_embed_batch_embed_tiles", "group_tile_batch_tile_slide",
                               "rule_collect_failures", "rule_sample_embeddings"], by_name
    assert all(len(ids) == 1 for ids in by_name.values()), by_name
    # Only the GPU rule's job held the (fake) GPU; the profile's memory and time reached SLURM.
    for job_id, name in submitted.items():
        fields = scontrol_job(job_id)
        gpus = fields.get("TresPerJob", "") + fields.get("TresPerNode", "")
        assert ("gres:gpu:1" in gpus) == (name == "group_embed_batch_embed_tiles"), (name, fields)
        # The comment names the rule (batch rules add their wildcards).
        assert fields["Comment"].startswith(name.replace("group_", "rule_", 1)), fields
    # The group job asked for what its members run one after another need: the largest
    # member's memory, the sum of their runtimes (minutes).
    embed_job = finished[by_name["group_embed_batch_embed_tiles"][0]]
    members = rule_resources(run.stdout, "embed_tiles")
    assert len(members) == len(SLIDES), run.stdout[-3000:]
    assert embed_job.tres["mem"] == f"{max(int(m['mem_mb']) for m in members)}M", embed_job.fields
    assert int(embed_job.fields["TimeLimit"]) == sum(int(m["runtime"]) for m in members), embed_job.fields

    # A second run finds everything done and submits nothing.
    rerun = _snakemake(overrides, env, workdir, sheet, results, targets)
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout, rerun.stdout[-3000:]
    assert len([j for j in slurm_cluster.jobs() if j.fields.get("WorkDir") == str(workdir)]) == len(finished)


def _job_logs(workdir: Path) -> str:
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
