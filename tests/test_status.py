"""``histopipe status``: a cohort's state from its sheet and results folder, no job graph."""

from __future__ import annotations

from pathlib import Path

import pytest

from histopipe import paths
from histopipe.config import load_config
from histopipe.sheet import read_sheet
from histopipe.status import cohort_status, log_error
from histopipe.workflow import Cohort
from tests.helpers import run_cli

TILING = {"mpp": 2.0, "tile_size": 128}


@pytest.fixture
def cohort_tree(tmp_path, cmu_slide) -> tuple[Path, Path, Cohort]:
    """Five slides in every state a tiling job can leave, made by the real ``histopipe tile``:
    one tiled, one unreadable but skipped (a failed store), one whose job failed (no store, an
    error in its log), one running (a log, no store) and one not started."""
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"\x00" * 4096)
    ids = ["good", "skipped", "crashed", "running", "waiting"]
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("slide_id\tpath\n" + "".join(f"{s}\t{cmu_slide if s == 'good' else junk}\n" for s in ids))
    results = tmp_path / "results"
    cfg = load_config(None, {"sheet": str(sheet), "results": str(results), "tiling": TILING})
    cohort = Cohort(read_sheet(sheet), cfg)
    t = cohort.tiling_id
    store = {s: paths.TILES.format(results=results, tiling=t, slide=s) for s in ids}
    log = {s: Path(paths.LOG.format(results=results, rule="tile_slide", name=f"{t}/{s}")) for s in ids}
    opts = ["--mpp", "2", "--tile-size", "128"]
    assert run_cli("tile", cmu_slide, store["good"], "--slide-id", "good", *opts).returncode == 0
    assert run_cli("tile", junk, store["skipped"], "--slide-id", "skipped", "--on-error", "skip", *opts).returncode == 0
    crashed = run_cli("tile", junk, store["crashed"], "--slide-id", "crashed", *opts)
    assert crashed.returncode != 0 and not Path(store["crashed"]).exists()
    log["crashed"].parent.mkdir(parents=True)
    log["crashed"].write_text(crashed.stdout + crashed.stderr)
    log["running"].write_text("INFO histopipe.tiling: reading the slide\n")
    # Snakemake's benchmark file of the finished job (its format: a header, then the values).
    bench = Path(paths.BENCHMARK.format(results=results, rule="tile_slide", name=f"{t}/good"))
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\n12.50\t0:00:12\t100.0\n")
    return sheet, results, cohort


def test_tiling_states_reasons_and_time(cohort_tree):
    _, _, cohort = cohort_tree
    st = cohort_status(cohort)
    tile = st.stages[0]
    assert tile.stage == "tile"
    assert tile.counts == {"done": 1, "failed": 2, "started": 1, "pending": 1}
    assert (tile.seconds, tile.timed_jobs) == (12.5, 1)
    reasons = {f.slide: f.reason for f in st.failures}
    assert set(reasons) == {"skipped", "crashed"}
    assert "junk.svs" in reasons["skipped"] and "unsupported or corrupt" in reasons["skipped"]
    assert reasons["crashed"].startswith("histopipe tile: error:") and "junk.svs" in reasons["crashed"]
    # Nothing downstream exists yet: every later stage is pending for every slide.
    for stage in st.stages[1:]:
        assert stage.counts["pending"] == 5 and stage.total == 5, stage
    assert all(s.counts["done"] == 0 for s in st.steps)
    assert st.mismatches == []


def test_cli_prints_stages_and_failures(cohort_tree, tmp_path):
    sheet, results, _ = cohort_tree
    config = tmp_path / "config.yaml"
    config.write_text("tiling:\n  mpp: 2.0\n  tile_size: 128\n")
    r = run_cli("status", "--config", config, "--sheet", sheet, "--results", results, "--failed-tsv", tmp_path / "f.tsv")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.strip()}
    assert rows["tile"][:4] == ["1", "2", "1", "1"] and rows["tile"][-1] == "0:00:12"
    assert rows["embed"][:4] == ["0", "0", "0", "5"]
    assert "failed (2):" in r.stdout and "mpp2_px128" in r.stdout
    failed = (tmp_path / "f.tsv").read_text().splitlines()
    assert failed[0] == "slide_id\tstage\treason" and sorted(x.split("\t")[0] for x in failed[1:]) == ["crashed", "skipped"]


def test_results_of_other_settings_are_named(cohort_tree, tmp_path):
    """The same results folder read with another tiling: nothing of the config's is there."""
    sheet, results, _ = cohort_tree
    config = tmp_path / "other.yaml"
    config.write_text("tiling:\n  mpp: 0.5\n  tile_size: 256\n")
    r = run_cli("status", "--config", config, "--sheet", sheet, "--results", results)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("settings differ")]
    assert len(lines) == 1 and "found tiling mpp2_px128" in lines[0] and "expects mpp0.5_px256" in lines[0], r.stdout
    assert r.stdout.count("\ntile ") == 1 and "      0        0        0        5" in r.stdout


def test_log_error_finds_the_message_not_warnings(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("WARNING x: slow read\nUserWarning: something\n")
    assert log_error(log) is None
    log.write_text("Traceback (most recent call last):\n  File x\nValueError: bad tile size\n")
    assert log_error(log) == "ValueError: bad tile size"
    assert log_error(tmp_path / "missing.log") is None
