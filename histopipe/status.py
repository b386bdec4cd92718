"""Where a cohort's run stands, from the sheet and the files under ``results`` alone.

Snakemake's own views (``--summary``, ``--dry-run``) build the whole job graph, which takes
minutes at 10 000 slides. This module never does: it fills the output templates of
:mod:`histopipe.paths` for the sheet's slides and looks at what is on disk. Per stage and
slide an output is

- ``done``: it exists (a tile or patch store whose ``status`` attribute is ``failed`` or
  ``empty`` counts as ``failed``, with the store's reason);
- ``failed``: no output, and the job's log ends in an error (histopipe's one-line
  ``error:`` message or a traceback), which is the reason given;
- ``started``: no output, a log without an error: the job is running, or was killed
  without a message (a SLURM time limit, a lost node);
- ``pending``: neither output nor log.

Time per stage is the sum of the Snakemake benchmark files (wall seconds, ``s``) of the
current settings' jobs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from histopipe import paths
from histopipe.workflow import Cohort

STATES = ("done", "failed", "started", "pending")
# The last lines of a log that are searched for an error message.
_LOG_TAIL_BYTES = 4096


@dataclass
class StageStatus:
    """Slide counts of one per-slide stage (``cohort`` stages count one output)."""

    stage: str
    rule: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    seconds: float = 0.0
    timed_jobs: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Failure:
    slide: str  # a slide id, or "(cohort)" for a cohort-level step
    stage: str
    reason: str


@dataclass
class CohortStatus:
    slides: int
    settings: dict[str, str]
    stages: list[StageStatus]
    steps: list[StageStatus]  # cohort-level rules: counts of their jobs (one output each)
    failures: list[Failure]
    mismatches: list[str]


def store_attrs(store: str | Path) -> dict | None:
    """The attributes of a zarr group (v3 ``zarr.json`` or v2 ``.zattrs``), or None when
    there is no store. Reads one small JSON file; no zarr import."""
    store = Path(store)
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except FileNotFoundError:
        pass
    try:
        return json.loads((store / ".zattrs").read_text())
    except FileNotFoundError:
        return {} if store.is_dir() and (store / ".zgroup").exists() else None


def log_error(log: str | Path) -> str | None:
    """The error a job's log ends with, or None (no log: see :func:`_job_state`)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            lines = [x.strip() for x in fh.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if " error: " in line or line.startswith(("Error", "WorkflowError")) or "Error: " in line:
            return line
    if any(x.startswith("Traceback") for x in lines):
        return lines[-1]
    return None


def _job_state(log: Path) -> tuple[str, str]:
    """State and reason of a job whose output is missing."""
    if not log.exists():
        return "pending", ""
    err = log_error(log)
    return ("failed", err) if err else ("started", "")


def benchmark_seconds(results: str, rule: str, name: str) -> tuple[float, int]:
    """Wall seconds summed over the benchmark file ``name`` of ``rule`` and every file under
    the folder of that name (a stage's per-slide files), and how many files there were."""
    base = Path(paths.BENCHMARK.format(results=results, rule=rule, name=name))
    files = [base] if base.is_file() else []
    folder = base.with_suffix("")
    if folder.is_dir():
        files += _tsv_files(folder)
    total = 0.0
    for f in files:
        try:
            with open(f) as fh:
                fh.readline()
                total += float(fh.readline().split("\t", 1)[0])
        except (OSError, ValueError, IndexError):
            continue  # a benchmark being written, or not one of Snakemake's
    return total, len(files)


def _tsv_files(folder: Path) -> list[Path]:
    out = []
    for entry in os.scandir(folder):
        if entry.is_dir():
            out += _tsv_files(Path(entry.path))
        elif entry.name.endswith(".tsv"):
            out.append(Path(entry.path))
    return out


def _listing(folder: str | Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


class _Collector:
    def __init__(self, cohort: Cohort):
        self.cohort = cohort
        self.r = cohort.results
        self.failures: list[Failure] = []

    def log(self, rule: str, name: str) -> Path:
        return Path(paths.LOG.format(results=self.r, rule=rule, name=name))

    def timed(self, st: StageStatus, name: str) -> StageStatus:
        st.seconds, st.timed_jobs = benchmark_seconds(self.r, st.rule, name)
        return st

    def per_slide(self, stage: str, rule: str, template: str, log_name: str, bench_name: str,
                  check_status: bool, **values: str) -> StageStatus:
        """A stage with one job and one store per slide (tiling, embedding)."""
        st = StageStatus(stage, rule)
        folder = Path(template.format(results=self.r, slide="x", **values)).parent
        present = _listing(folder)
        for s in self.cohort.slide_ids:
            store = template.format(results=self.r, slide=s, **values)
            if Path(store).name in present:
                state, reason = self._store_state(store, check_status)
            else:
                state, reason = _job_state(self.log(rule, log_name.format(slide=s)))
            self._count(st, s, state, reason)
        return self.timed(st, bench_name)

    def per_batch(self, stage: str, rule: str, batch_template: str, log_name: str, bench_name: str,
                  check_status: bool, **values: str) -> StageStatus:
        """A stage whose jobs write a batch folder holding ``<slide>.zarr`` per slide."""
        st = StageStatus(stage, rule)
        for batch, members in self.cohort.batches.items():
            folder = batch_template.format(results=self.r, batch=batch, **values)
            present = _listing(folder)
            missing = [s for s in members if f"{s}.zarr" not in present]
            batch_state, reason = _job_state(self.log(rule, log_name.format(batch=batch))) if missing else ("done", "")
            for s in members:
                if f"{s}.zarr" in present:
                    state, why = self._store_state(f"{folder}/{s}.zarr", check_status)
                else:
                    state, why = batch_state, f"batch-{batch}: {reason}" if reason else ""
                self._count(st, s, state, why)
        return self.timed(st, bench_name)

    def _store_state(self, store: str, check_status: bool) -> tuple[str, str]:
        if not check_status:
            return "done", ""
        a = store_attrs(store) or {}
        if a.get("status") in ("failed", "empty"):
            return "failed", " ".join(str(a.get("reason") or a["status"]).split())
        return "done", ""

    def _count(self, st: StageStatus, slide: str, state: str, reason: str) -> None:
        st.counts[state] += 1
        if state == "failed":
            self.failures.append(Failure(slide, st.stage, reason))

    def step(self, steps: dict[str, StageStatus], rule: str, output: str, log_name: str) -> None:
        """One job of a cohort-level rule (one output), counted into ``steps[rule]``."""
        if Path(output).exists():
            state, reason = "done", ""
        else:
            state, reason = _job_state(self.log(rule, log_name))
        st = steps.setdefault(rule, StageStatus(rule, rule))
        st.counts[state] += 1
        if state == "failed":
            self.failures.append(Failure("(cohort)", f"{rule} {log_name}", reason))
        seconds, n = benchmark_seconds(self.r, rule, log_name)
        st.seconds += seconds
        st.timed_jobs += n


def settings_mismatches(cohort: Cohort) -> list[str]:
    """Settings folders under ``results`` that differ from the config's, where the config's
    own is absent: a results folder written with another tiling, encoder, k or patch setting."""
    r, c = Path(cohort.results), cohort
    checks = [
        ("tiling", r / "tiles", c.tiling_id),
        ("encoder", r / "embeddings", c.encoder),
        ("tiling of the embeddings", r / "embeddings" / c.encoder, c.tiling_id),
        ("k", r / "maps" / c.encoder / c.tiling_id, f"k{c.k}"),
        ("dataset (map source, tiling, patch setting)", r / "dataset", c.dataset_id),
    ]
    out = []
    for what, folder, expected in checks:
        found = sorted(n for n in _listing(folder) if (folder / n).is_dir() and n != expected)
        if found and expected not in _listing(folder):
            out.append(f"{folder}: found {what} {', '.join(found)}; the config expects {expected}")
    return out


def cohort_status(cohort: Cohort) -> CohortStatus:
    """Counts per stage, cohort-level steps, failed slides with their reasons and settings
    mismatches of ``cohort`` (sheet + config) against its results folder."""
    c, col = cohort, _Collector(cohort)
    t, e, d = c.tiling_id, c.encoder, c.dataset_id
    stages = [
        col.per_slide("tile", "tile_slide", paths.TILES, f"{t}/{{slide}}", t, True, tiling=t),
        col.per_slide("embed", "embed_tiles", paths.EMBEDDINGS, f"{e}/{t}/{{slide}}", f"{e}/{t}", False,
                      encoder=e, tiling=t),
    ]
    fitted = c.map_source == "kmeans" and not c.config["clustering"].get("model")
    if fitted:
        stages.append(col.per_batch("sample", "sample_embeddings", paths.CLUSTER_SAMPLE_BATCH,
                                    f"{e}/{t}/batch-{{batch}}", f"{e}/{t}", False, encoder=e, tiling=t))
    if c.map_source == "kmeans":
        stages.append(col.per_batch("map", "map_tissue_types", paths.TISSUE_MAP_BATCH,
                                    f"{c.cluster_name()}/batch-{{batch}}", c.cluster_name(), False,
                                    encoder=e, tiling=t, k=str(c.k)))
    else:
        stages.append(col.per_batch("map", "map_annotation", paths.ANNOTATION_MAP_BATCH, f"{t}/batch-{{batch}}",
                                    t, False, tiling=t))
    stages.append(col.per_batch("patches", "extract_patches", paths.SLIDE_PATCHES_BATCH, f"{d}/batch-{{batch}}", d,
                                True, dataset=d))
    steps: dict[str, StageStatus] = {}
    r = c.results
    if fitted:
        col.step(steps, "fit_kmeans", c.fitted_cluster_model(), c.cluster_name())
    col.step(steps, "merge_patches", c.dataset(), d)
    if c.trains_vae:
        col.step(steps, "train_vae", paths.VAE_MODEL.format(results=r, dataset=d), d)
    for v in c.trained_variants:  # not those ldm.models reuses
        col.step(steps, "train_ldm", paths.LDM_MODEL.format(results=r, dataset=d, variant=v), f"{d}/{v}")
    for v in c.variants:
        col.step(steps, "synthesize", c.synthetic(v), f"{d}/{v}")
    col.step(steps, "train_segmenter", c.segmenter(), d)
    for v in c.variants:
        col.step(steps, "evaluate_distribution", paths.EVAL_DISTRIBUTION.format(results=r, dataset=d, variant=v), f"{d}/{v}")
    for m, v in c.segmentation_runs():
        col.step(steps, "evaluate_segmentation", paths.EVAL_SEGMENTATION.format(results=r, dataset=d, mode=m, variant=v),
                 f"{d}/{m}/{v}")
    col.step(steps, "tabulate_ablation", paths.ABLATION_TABLE.format(results=r, dataset=d, ext="tsv"), d)
    settings = {"tiling": t, "encoder": e, "map source": c.map_source, "dataset": d}
    if c.map_source == "kmeans":
        settings["k"] = str(c.k)
    return CohortStatus(len(c.slide_ids), settings, stages, list(steps.values()), col.failures, settings_mismatches(c))


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_status(st: CohortStatus, max_failures: int = 50) -> str:
    """The status as plain-text tables (stages, cohort steps, failed slides)."""
    lines = [f"{st.slides} slides; " + ", ".join(f"{k} {v}" for k, v in st.settings.items())]
    for m in st.mismatches:
        lines.append(f"settings differ: {m}")
    header = f"{'':<22}" + "".join(f"{s:>9}" for s in STATES) + f"{'timed jobs':>12}{'time h:m:s':>12}"
    lines += ["", "slides per stage", header]
    lines += [_row(s) for s in st.stages]
    lines += ["", "cohort-level jobs", header]
    lines += [_row(s) for s in st.steps]
    if st.failures:
        lines += ["", f"failed ({len(st.failures)}):"]
        for f in st.failures[:max_failures]:
            lines.append(f"  {f.slide}\t{f.stage}\t{f.reason or '(no reason recorded)'}")
        if len(st.failures) > max_failures:
            lines.append(f"  ... and {len(st.failures) - max_failures} more (--max-failures, or --failed-tsv FILE for all)")
    return "\n".join(lines)


def _row(s: StageStatus) -> str:
    return f"{s.stage:<22}" + "".join(f"{s.counts[k]:>9}" for k in STATES) + f"{s.timed_jobs:>12}{_duration(s.seconds):>12}"


def failures_tsv(failures: Iterable[Failure]) -> str:
    rows = ["slide_id\tstage\treason"] + [f"{f.slide}\t{f.stage}\t{f.reason}" for f in failures]
    return "\n".join(rows) + "\n"
