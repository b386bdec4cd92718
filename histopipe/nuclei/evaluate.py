"""Evaluation of synthetic nuclei data: FD against real test images, and the downstream
segmenter trained on real vs real + synthetic, with the gain on rare classes.

``evaluate_nuclei`` is the entry point on stores (a thin layer over Part A's
``NucleiDataset``); ``evaluate_datasets`` does the work on any datasets of the
``NucleiDataset`` item layout and writes ``metrics.json``, ``metrics.tsv`` and ``metrics.md``
atomically into ``out_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histopipe import __version__
from histopipe.atomic import atomic_write_text
from histopipe.config import section
from histopipe.errors import ConfigError, HistopipeError
from histopipe.evaluation.distribution import EncoderFactory, registry_factory
from histopipe.evaluation.features import embed_set
from histopipe.evaluation.frechet import frechet_distance_stats
from histopipe.evaluation.outputs import format_cell, write_json, write_tsv
from histopipe.evaluation.settings import resolve_device
from histopipe.nuclei.dataset import NucleiDataset
from histopipe.nuclei.segmentation import SegmenterSettings, run_arms

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("dice", "aji", "pq", "dq", "sq", "f1_detection", "accuracy")


@dataclass(frozen=True)
class NucleiEvaluationSettings:
    """The ``nuclei.evaluation`` config section (keys and units in the schema)."""

    encoders: tuple[str, ...] = ("efficientnet_lite0",)
    encoder_weights: dict = field(default_factory=dict)
    device: str = "auto"
    max_samples: int | None = 10000
    batch_size: int = 32
    seed: int = 0
    rare_fraction: float = 0.1
    rare_classes: tuple = ()
    segmentation: SegmenterSettings = field(default_factory=SegmenterSettings)

    def __post_init__(self):
        if isinstance(self.segmentation, dict):
            object.__setattr__(self, "segmentation", section({"s": self.segmentation}, "s", SegmenterSettings))
        object.__setattr__(self, "encoders", tuple(self.encoders))
        object.__setattr__(self, "rare_classes", tuple(self.rare_classes))
        if not 0 <= self.rare_fraction <= 1:
            raise ConfigError("config.nuclei.evaluation.rare_fraction: must be in [0, 1]")


def load_settings(cfg: dict) -> NucleiEvaluationSettings:
    """The typed section from a config dict as returned by ``histopipe.config.load_config``."""
    return section(cfg.get("nuclei", {}), "evaluation", NucleiEvaluationSettings)


class DatasetImages:
    """Images uint8 (B, S, S, 3) of a nuclei dataset, a seeded subset of ``max_samples``, in
    the interface ``histopipe.evaluation.features.embed_set`` reads (len, batches, path)."""

    def __init__(self, dataset: Dataset, name: str, max_samples: int | None = None, seed: int = 0):
        n = len(dataset)
        rows = np.arange(n)
        if max_samples is not None and n > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        self.dataset, self.rows, self.path, self.n_available = dataset, rows, name, n

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.rows), batch_size):
            images = [torch.as_tensor(self.dataset[int(i)]["image"]) for i in self.rows[start:start + batch_size]]
            x = torch.stack(images).float().permute(0, 2, 3, 1)
            yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    def describe(self) -> dict:
        return {"name": self.path, "n_available": int(self.n_available), "n_used": len(self)}


def frechet_distances(real: DatasetImages, synthetic: DatasetImages, settings: NucleiEvaluationSettings,
                      encoder_factory: EncoderFactory = registry_factory) -> dict[str, dict]:
    """FD between the real and the synthetic images in every configured encoder."""
    device = resolve_device(settings.device)
    out = {}
    for name in settings.encoders:
        encoder = encoder_factory(name, weights=settings.encoder_weights.get(name), device=str(device))
        real_stats, _ = embed_set(encoder, real, settings.batch_size)
        syn_stats, _ = embed_set(encoder, synthetic, settings.batch_size)
        out[name] = {
            "fd": frechet_distance_stats(real_stats.stats(), syn_stats.stats()),
            "dim": int(encoder.dim),
            "n_real": real_stats.n,
            "n_synthetic": syn_stats.n,
            "weights_sha256": getattr(encoder, "weights_sha256", None),
        }
        del encoder
    return out


def class_counts(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Nuclei per class int64 (C,) of a dataset, from its point rasters (one pixel a nucleus)."""
    counts = np.zeros(num_classes, np.int64)
    for i in range(len(dataset)):
        points = np.asarray(dataset[i]["points"]).ravel()
        counts += np.bincount(points[points > 0], minlength=num_classes)[:num_classes]
    return counts


def select_rare(counts: np.ndarray, class_names: Sequence[str], fraction: float,
                explicit: Sequence[str | int] = ()) -> dict:
    """Rare classes: those listed in ``explicit`` (names or ids), else the nucleus classes
    (ids >= 1) whose share of the nuclei in ``counts`` (C,) is below ``fraction``."""
    total = int(counts[1:].sum())
    shares = {class_names[k]: (float(counts[k] / total) if total else float("nan"))
              for k in range(1, len(class_names))}
    if explicit:
        ids = []
        for c in explicit:
            k = c if isinstance(c, int) else (class_names.index(c) if c in class_names else -1)
            if not 1 <= k < len(class_names):
                raise ConfigError(f"config.nuclei.evaluation.rare_classes: {c!r} is not a nucleus class "
                                  f"of the real store ({list(class_names[1:])})")
            ids.append(k)
        rule = "explicit"
    else:
        ids = [k for k in range(1, len(class_names)) if total and counts[k] / total < fraction]
        rule = f"share < {fraction}"
    ids = sorted(set(ids))
    return {"classes": ids, "names": [class_names[k] for k in ids], "rule": rule,
            "shares": shares, "n_nuclei": total}


def rare_gain(arms: dict[str, dict], rare: dict) -> dict:
    """Per-class F1 of each arm on the rare classes, the gain of real + synthetic over real,
    and the mean gain (NaN when there is no synthetic arm or no rare class)."""
    out = {"per_class": {}, "mean_gain": float("nan")}
    gains = []
    for name in rare["names"]:
        f1 = {arm: r["per_class"][name]["f1"] for arm, r in arms.items()}
        gain = f1["real_synthetic"] - f1["real"] if "real_synthetic" in f1 else float("nan")
        out["per_class"][name] = {**{f"f1_{a}": v for a, v in f1.items()}, "gain": gain}
        gains.append(gain)
    finite = [g for g in gains if np.isfinite(g)]
    if finite:
        out["mean_gain"] = float(np.mean(finite))
    return out


def table_rows(result: dict) -> tuple[list[dict], list[str]]:
    """One row per arm plus a ``gain`` row (real_synthetic - real), and the column names."""
    names = result["class_names"][1:]
    rare = set(result["rare"]["names"])
    fd = {f"fd_{e}": v["fd"] for e, v in result["fd"].items()}
    columns = ["arm", "n_train_real", "n_train_synthetic", "n_test", "seed", "steps", *SCORE_COLUMNS,
               *(f"f1_{n}" for n in names), "f1_rare_mean", *fd]
    rows = []
    for arm, r in result["arms"].items():
        row = {k: r[k] for k in ("n_train_real", "n_train_synthetic", "n_test", "seed", *SCORE_COLUMNS)}
        row.update({"arm": arm, "steps": r["settings"]["steps"]})
        row.update({f"f1_{n}": r["per_class"][n]["f1"] for n in names})
        rare_f1 = [r["per_class"][n]["f1"] for n in names if n in rare]
        row["f1_rare_mean"] = float(np.nanmean(rare_f1)) if rare_f1 and np.isfinite(rare_f1).any() else None
        if arm == "real_synthetic":
            row.update(fd)
        rows.append(row)
    if {"real", "real_synthetic"} <= set(result["arms"]):
        a, b = rows[0], rows[1]
        gain = {"arm": "gain"}
        for c in columns[6:]:
            if c.startswith("fd_"):
                continue
            va, vb = a.get(c), b.get(c)
            gain[c] = vb - va if va is not None and vb is not None else None
        rows.append(gain)
    return rows, columns


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def evaluate_datasets(
    settings: NucleiEvaluationSettings,
    real_train: Dataset,
    real_test: Dataset,
    synthetic: Dataset | None,
    class_names: Sequence[str],
    out_dir: str | Path,
    encoder_factory: EncoderFactory = registry_factory,
    sources: dict | None = None,
) -> dict:
    """FD (real test vs synthetic), both arms, rare-class gain; writes the three tables."""
    class_names = list(class_names)
    num_classes = len(class_names)
    device = resolve_device(settings.device)
    counts = class_counts(real_train, num_classes)
    rare = select_rare(counts, class_names, settings.rare_fraction, settings.rare_classes)
    fd = {}
    if synthetic is not None:
        fd = frechet_distances(DatasetImages(real_test, "real_test", settings.max_samples, settings.seed),
                               DatasetImages(synthetic, "synthetic", settings.max_samples, settings.seed + 1),
                               settings, encoder_factory)
    arms = run_arms(real_train, synthetic, real_test, num_classes, settings.segmentation,
                    settings.seed, device, class_names)
    result = {
        "kind": "nuclei_evaluation",
        "sources": sources or {},
        "class_names": class_names,
        "train_class_counts": {n: int(c) for n, c in zip(class_names, counts, strict=True)},
        "n_real_train": len(real_train),
        "n_real_test": len(real_test),
        "n_synthetic": len(synthetic) if synthetic is not None else 0,
        "seed": settings.seed,
        "encoders": list(settings.encoders),
        "settings": asdict(settings),
        "device": str(device),
        "fd": fd,
        "arms": arms,
        "rare": {**rare, **rare_gain(arms, rare)},
        "histopipe_version": __version__,
    }
    rows, columns = table_rows(result)
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", result)
    write_tsv(out_dir / "metrics.tsv", rows, columns)
    atomic_write_text(out_dir / "metrics.md", markdown_table(rows, columns))
    return result


def evaluate_nuclei(cfg: dict, real_store: str | Path, synthetic_store: str | Path | None,
                    out_dir: str | Path, encoder_factory: EncoderFactory = registry_factory) -> dict:
    """Evaluate a synthetic nuclei store against a real one (Part A's store format): FD in
    the configured encoders, the segmenter arms on the real test split, rare-class gain.

    The real test items carry their true ``instances`` (``NucleiDataset``), which the
    instance scores need. Both stores must share one class list, in one order.
    """
    settings = load_settings(cfg)
    real_train = NucleiDataset(real_store, split="train")
    real_test = NucleiDataset(real_store, split="test")
    if len(real_train) == 0 or len(real_test) == 0:
        raise HistopipeError(f"{real_store}: the real store needs train and test patches "
                             f"(has {len(real_train)} train, {len(real_test)} test)")
    class_names = list(real_train.class_names)
    synthetic = None
    if synthetic_store is not None:
        synthetic = NucleiDataset(synthetic_store, split=None)
        if list(synthetic.class_names) != class_names:
            raise HistopipeError(f"{synthetic_store}: classes {list(synthetic.class_names)} differ from "
                                 f"the real store's {class_names} ({real_store})")
    sources = {"real_store": str(real_store), "synthetic_store": str(synthetic_store) if synthetic_store else None}
    return evaluate_datasets(settings, real_train, real_test, synthetic, class_names, out_dir,
                             encoder_factory=encoder_factory, sources=sources)
