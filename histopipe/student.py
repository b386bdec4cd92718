"""Student classifier: a light timm CNN that predicts tissue types from tile pixels.

Trained on (tile pixels, finest k-means type) pairs of training slides, it labels new
slides without the foundation model. Slides, never tiles, are split into train and
held-out sets, and agreement with the k-means types (accuracy) on the held-out slides is
reported at every level of the hierarchy (a prediction agrees at a coarse level when it
falls in the same coarse type).

A saved student is a folder: ``model.safetensors``, ``student.json`` (architecture,
classes, input size, normalisation, level LUTs, label names, metrics) and, once evaluated,
``metrics.json`` (agreement with the k-means types on held-out slides, per level).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from histopipe.atomic import atomic_path
from histopipe.errors import ConfigError, HistopipeError, WeightsError
from histopipe.tiling import TileSource
from histopipe.tissuemap import TileGrid, TissueMap, rasterize_tiles, read_map

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentConfig:
    """The ``clustering.student`` config section."""

    enabled: bool = False
    architecture: str = "mobilenetv3_small_050"
    weights: str | None = None
    tile_size: int = 128
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_tiles_per_slide: int = 2000
    val_fraction: float = 0.2
    num_workers: int = 2
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: dict) -> StudentConfig:
        values = dict(cfg.get("clustering", {}).get("student", {}))
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"config.clustering.student: unknown keys {sorted(unknown)}")
        return cls(**values)


def to_tensor(tiles: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, size, size), ImageNet-normalised."""
    if tiles.shape[1] != size or tiles.shape[2] != size:
        tiles = np.stack([cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA) for t in tiles])
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


class TileLabels(Dataset):
    """(tile pixels, finest type) of selected tiles of several slides."""

    def __init__(self, sources: Sequence[TileSource], tiles: Sequence[np.ndarray], types: Sequence[np.ndarray], size: int):
        self.sources = list(sources)
        self.index = [(s, int(i), int(t)) for s, (idx, ty) in enumerate(zip(tiles, types, strict=True)) for i, t in zip(idx, ty, strict=True)]
        self.size = size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, int]:
        s, i, t = self.index[n]
        return to_tensor(self.sources[s][i][None], self.size)[0], t


def split_slides(slide_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of whole slides: (train, held-out); at least one of each when ≥ 2 slides."""
    ids = sorted(slide_ids)
    if len(ids) < 2:
        return ids, []
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val = sorted(ids[i] for i in order[:n_val])
    return [s for s in ids if s not in val], val


def build_net(architecture: str, num_classes: int, weights: str | None = None) -> torch.nn.Module:
    """A timm classifier; pretrained from a local file when ``weights`` is given."""
    try:
        if weights:
            return timm.create_model(architecture, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay={"file": str(weights)})
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    except RuntimeError as err:
        raise WeightsError(f"{weights or architecture}: cannot build student {architecture!r}: {err}") from None
    except Exception as err:
        raise ConfigError(f"clustering.student.architecture {architecture!r}: {err}") from None


@dataclass
class StudentModel:
    net: torch.nn.Module
    meta: dict[str, Any]

    @property
    def level_luts(self) -> np.ndarray:
        """int64 (L, num_labels): finest label to each level's label (label = type + 1)."""
        return np.asarray(self.meta["level_luts"], dtype=np.int64)

    @torch.no_grad()
    def predict_pixels(self, tiles: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Finest type (int64 (B,)) of uint8 tiles (B, H, W, 3)."""
        self.net.eval().to(device)
        return self.net(to_tensor(tiles, int(self.meta["tile_size"])).to(device)).argmax(1).cpu().numpy()

    def predict_store(self, tile_store: str | Path, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
        """Types of every tile of a tile store at every level: int64 (N, L), finest first."""
        source = TileSource(tile_store)
        fine = np.empty(len(source), dtype=np.int64)
        try:
            for start in range(0, len(source), batch_size):
                idx = range(start, min(start + batch_size, len(source)))
                fine[start : start + len(idx)] = self.predict_pixels(source.read_batch(idx), device)
        finally:
            source.close()
        return self.level_luts[:, fine + 1].T - 1

    def save(self, folder: str | Path) -> None:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "student.json").write_text(json.dumps(self.meta, indent=1) + "\n")
            if "metrics" in self.meta:
                (tmp / "metrics.json").write_text(json.dumps(self.meta["metrics"], indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> StudentModel:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "student.json").read_text())
            state = load_file(folder / "model.safetensors")
        except (OSError, ValueError) as err:
            raise HistopipeError(f"{folder}: not a student model folder (student.json, model.safetensors): {err}") from None
        net = build_net(meta["architecture"], int(meta["num_classes"]))
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsError(f"{folder}/model.safetensors: does not fit {meta['architecture']}: {err}") from None
        return cls(net.eval(), meta)


def _slide_tiles(map_path: Path, tile_path: Path) -> tuple[TissueMap, TileGrid, np.ndarray]:
    tmap, grid = read_map(map_path), TileGrid.from_tile_store(tile_path)
    labels = tmap.tile_labels(grid)[:, 0] if len(grid.coords) else np.zeros(0, dtype=np.int64)
    return tmap, grid, labels


def train_student(
    pairs: Sequence[tuple[str | Path, str | Path]], cfg: StudentConfig, seed: int = 0,
) -> tuple[StudentModel, dict]:
    """Train on (map, tile store) pairs of k-means maps; evaluate on held-out slides.

    Returns the model and metrics: ``agreement`` (finest level accuracy on held-out tiles),
    ``agreement_per_level`` {k: accuracy}, tile and slide counts.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    slides = []
    for map_path, tile_path in pairs:
        tmap, grid, labels = _slide_tiles(Path(map_path), Path(tile_path))
        keep = np.flatnonzero(labels > 0)
        if len(keep) > cfg.max_tiles_per_slide:
            keep = np.sort(rng.choice(keep, cfg.max_tiles_per_slide, replace=False))
        slides.append((grid.slide_id, tmap, TileSource(tile_path), keep, labels[keep] - 1))
    if not slides:
        raise HistopipeError("train-student: no (map, tile store) pairs given")
    ref = slides[0][1].attrs
    num_classes = int(ref["num_labels"]) - 1
    train_ids, val_ids = split_slides([s[0] for s in slides], cfg.val_fraction, seed)
    part = {name: [s for s in slides if s[0] in ids] for name, ids in (("train", train_ids), ("val", val_ids))}
    train = TileLabels([s[2] for s in part["train"]], [s[3] for s in part["train"]], [s[4] for s in part["train"]], cfg.tile_size)
    if len(train) == 0:
        raise HistopipeError("train-student: the training slides have no labelled tiles")
    net = build_net(cfg.architecture, num_classes, cfg.weights).to(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, drop_last=len(train) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False)
    t0 = time.time()
    for epoch in range(cfg.epochs):
        net.train()
        total, n = 0.0, 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x.to(cfg.device)), y.to(cfg.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        log.info("student epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, total / max(n, 1))
    meta = {
        "architecture": cfg.architecture,
        "num_classes": num_classes,
        "tile_size": cfg.tile_size,
        "mean": list(MEAN),
        "std": list(STD),
        "levels": list(ref["levels"]),
        "level_luts": np.asarray(ref.get("level_luts", [list(range(num_classes + 1))])).tolist(),
        "label_names": list(ref.get("label_names", [])),
        "tiling": ref.get("tiling"),
        "encoder": ref.get("encoder"),
        "cluster_model": ref.get("cluster_model"),
        "train_slides": train_ids,
        "val_slides": val_ids,
        "config": asdict(cfg),
        "seed": seed,
    }
    student = StudentModel(net.eval(), meta)
    metrics = evaluate(student, part["val"], cfg)
    metrics.update({"train_tiles": len(train), "train_slides": len(train_ids), "seconds": round(time.time() - t0, 1)})
    student.meta["metrics"] = metrics
    for s in slides:
        s[2].close()
    return student, metrics


def evaluate(student: StudentModel, slides: list, cfg: StudentConfig) -> dict:
    """Agreement of the student with the k-means types on held-out slides, per level."""
    luts = student.level_luts
    levels = student.meta["levels"]
    hits = np.zeros(len(levels))
    n = 0
    for _sid, _tmap, source, tiles, types in slides:
        for start in range(0, len(tiles), cfg.batch_size):
            idx = tiles[start : start + cfg.batch_size]
            pred = student.predict_pixels(source.read_batch(idx), cfg.device)
            true = types[start : start + cfg.batch_size]
            hits += (luts[:, pred + 1] == luts[:, true + 1]).sum(axis=1)
            n += len(idx)
    if n == 0:
        log.warning("student: no held-out slides (need at least 2 slides); agreement not measured")
        return {"agreement": None, "agreement_per_level": {}, "val_tiles": 0, "val_slides": 0}
    per_level = {str(k): round(float(h / n), 4) for k, h in zip(levels, hits, strict=True)}
    return {"agreement": per_level[str(levels[0])], "agreement_per_level": per_level, "val_tiles": n, "val_slides": len(slides)}


def student_map(student: StudentModel, tile_store: str | Path, student_path: str | Path | None = None, device: str = "cpu") -> TissueMap:
    """A contract #3 map of a slide labelled by the student (no embeddings needed)."""
    grid = TileGrid.from_tile_store(tile_store)
    types = student.predict_store(tile_store, device=device) if len(grid.coords) else np.zeros((0, len(student.meta["levels"])), np.int64)
    m = student.meta
    attrs = {
        "levels": m["levels"], "cell_level0": grid.cell_level0, "slide_id": grid.slide_id,
        "slide_path": grid.slide_path, "backend": grid.backend, "source": "kmeans", "assigned_by": "student",
        "student": str(student_path) if student_path else None, "num_labels": int(m["num_classes"]) + 1,
        "label_names": m["label_names"], "level_luts": m["level_luts"], "level0_width": grid.level0_width,
        "level0_height": grid.level0_height, "tiling": grid.attrs.get("tiling"), "encoder": m.get("encoder"),
        "cluster_model": m.get("cluster_model"), "n_tiles": len(grid.coords),
    }
    return TissueMap(rasterize_tiles(grid, types), attrs)
