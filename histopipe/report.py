"""Figures for the workflow report: training curves (loss and progress metrics) and
hallucination-flag examples."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from histopipe.atomic import atomic_write_bytes
from histopipe.errors import HistopipeError


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def read_scalars(work_dir: str | Path, tag: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of a TensorBoard scalar logged under ``work_dir`` (all event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(work_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise HistopipeError(f"{work_dir}: no TensorBoard event files (was the model trained here?)")
    points: dict[int, float] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                points[int(e.step)] = float(e.value)  # a resumed run re-logs steps: keep the last
    if not points:
        raise HistopipeError(f"{work_dir}: no '{tag}' scalars in the TensorBoard logs")
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


# Progress metrics shown beside the loss, in this order, with their axis labels.
PROGRESS_PANELS = {
    "fd": "Fréchet distance of samples (lower is better)",
    "label_miou": "label fidelity mIoU",
    "label_accuracy": "label fidelity accuracy",
    "psnr": "reconstruction PSNR (dB)",
    "f1": "centroid F1 (6 px)",
    "class_accuracy": "class accuracy of matched nuclei",
}


def training_curves_png(work_dir: str | Path, out: str | Path, title: str | None = None) -> None:
    """Training loss against optimiser step (raw and moving average, log-scaled), and one panel
    per progress metric of the run's evaluations (``progress.jsonl``: FD and label fidelity of
    EMA samples for the LDM, PSNR for the VAE), so that a run that does not learn shows early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histopipe.diffusion.training import read_progress

    steps, loss = read_scalars(work_dir)
    progress = read_progress(work_dir)
    panels = [k for k in PROGRESS_PANELS if any(k in r for r in progress)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 3.6 * len(panels), 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, color="0.75", lw=0.8, label="loss")
    w = max(1, len(loss) // 20)
    if len(loss) > w:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="C0", lw=1.6, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.set_title(title or Path(work_dir).name)
    ax.legend(frameon=False)
    for i, key in enumerate(panels, start=1):
        points = [(r["step"], r[key]) for r in progress if key in r]
        ax = axes[0, i]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", lw=1.4, ms=3)
        floor = [r["fd_real"] for r in progress if "fd_real" in r] if key == "fd" else []
        if floor:  # other held-out patches against the reference ones: what real tissue scores
            ax.axhline(floor[-1], color="0.4", ls="--", lw=1, label="real patches")
            ax.legend(frameon=False)
        ax.set_xlabel("step")
        ax.set_ylabel(PROGRESS_PANELS[key])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(out, _figure_bytes(fig))


def read_flags(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, scores, flagged)`` of a flags CSV written by ``flag-hallucinations``."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = np.array([int(r["id"]) for r in rows], dtype=np.int64)
    scores = np.array([float(r["score"]) for r in rows])
    flagged = np.array([r["flagged"] in ("1", "True", "true") for r in rows])
    return ids, scores, flagged


def flag_examples_png(flags: str | Path, synthetic: str | Path, out: str | Path, n: int = 8) -> dict:
    """The flag count and the ``n`` synthetic images farthest from the real data.

    Flagged images come first (highest score first); when fewer than ``n`` are flagged the
    highest-scoring unflagged ones fill the row, marked as such. Returns the counts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    ids, scores, flagged = read_flags(flags)
    images = zarr.open_group(str(synthetic), mode="r")["images"]
    order = np.argsort(-scores, kind="stable")[: max(1, min(n, len(ids)))] if len(ids) else np.array([], int)
    cols = max(1, len(order))
    fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols, 2.0), squeeze=False)
    for ax, j in zip(axes[0], order, strict=False):
        ax.imshow(np.asarray(images[int(ids[j])]))
        ax.set_title(f"{'FLAG' if flagged[j] else 'ok'} {scores[j]:.3g}", fontsize=7, color="C3" if flagged[j] else "0.3")
        ax.axis("off")
    for ax in axes[0][len(order) :]:
        ax.axis("off")
    summary = {"n": int(len(ids)), "flagged": int(flagged.sum())}
    fig.suptitle(f"{summary['flagged']} of {summary['n']} synthetic images flagged", fontsize=9)
    atomic_write_bytes(out, _figure_bytes(fig))
    return summary
