"""Heterogeneous training patches from a slide and its tissue-type map, with visual crops.

Geometry. A patch is ``patch_size`` px at ``mpp`` µm/px, i.e. ``size_l0 = patch_size * mpp /
slide_mpp`` level-0 px (the same physical-unit plan as the tile grid: ``plan_grid`` picks
the pyramid level; one resize to the output size). Candidate windows lie on a grid of
``stride`` px (at ``mpp``) anchored at the slide origin and lie fully inside the slide.

Selection, on the map raster (contract #3; a cell covers ``cell_level0`` level-0 px):

1. tissue fraction = area of non-background cells / window area (cells are weighted by
   the exact area they share with the window; cells outside the raster count as
   background); windows below ``min_tissue`` are dropped;
2. region proportions = area of each tissue type at map level ``level`` / tissue area
   (background excluded);
3. heterogeneity: ``bounds`` keeps a window iff max proportion ≤ ``upper`` and at least two
   types have proportion ≥ ``lower`` (the paper's 20–80 % rule for annotated data);
   ``entropy`` keeps it iff the Shannon entropy of the proportions, in **bits**
   (``-Σ p log2 p``; 1 bit = two equal regions, 0.72 bits = an 80/20 split), is ≥
   ``min_entropy``; ``auto`` uses ``bounds`` for annotation maps and ``entropy`` for k-means
   maps. Comparisons allow 1e-9 of rounding;
4. at most ``max_patches_per_slide``: a seeded random order, first taking windows that do
   not overlap any already taken (spread over the slide), then filling up with the rest.

Each kept patch gets its finest-level map upsampled to image resolution by nearest
neighbour (pixel centres), and up to ``max_crops`` visual crops: one per tissue region
(finest labels, largest area first), a square of side ``d`` drawn uniformly from the crop
range and clipped to the largest square inside the region, placed uniformly at random
fully inside the region's mask. A region where not even ``crop_min`` fits keeps its slot
with ``crop_valid`` False; unused slots have label 0 and are not valid.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import cv2
import numpy as np

from histopipe.errors import ConfigError
from histopipe.maps_io import MapStore
from histopipe.regions import largest_square, sample_square, square_fits
from histopipe.slides import SlideReader
from histopipe.tiling import GridPlan, TilingConfig, plan_grid

RULES = ("auto", "bounds", "entropy")
_EPS = 1e-9


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of slides per split (normalised by their sum)."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def fractions(self) -> tuple[float, float, float]:
        total = self.train + self.val + self.test
        return self.train / total, self.val / total, self.test / total


@dataclass(frozen=True)
class CropBankConfig:
    """Crop bank: up to ``per_type`` crops per tissue type, resized to ``size`` px."""

    per_type: int = 64
    size: int = 64
    splits: tuple[str, ...] = ("train",)


@dataclass(frozen=True)
class PatchConfig:
    """Config section ``patches`` (see workflow/schemas/config.schema.yaml)."""

    patch_size: int = 512
    mpp: float = 0.5
    output_size: int | None = None
    stride: int = 256
    min_tissue: float = 0.5
    level: int = 0
    rule: str = "auto"
    lower: float = 0.2
    upper: float = 0.8
    min_entropy: float = 0.7
    max_patches_per_slide: int | None = 200
    max_crops: int = 8
    crop_min: int = 50
    crop_max: int = 200
    seed: int = 0
    mpp_tolerance: float = 0.05
    split: SplitConfig = field(default_factory=SplitConfig)
    crop_bank: CropBankConfig = field(default_factory=CropBankConfig)

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):
            object.__setattr__(self, "split", SplitConfig(**self.split))
        if isinstance(self.crop_bank, dict):
            cb = dict(self.crop_bank)
            if "splits" in cb:
                cb["splits"] = tuple(cb["splits"])
            object.__setattr__(self, "crop_bank", CropBankConfig(**cb))
        problems = []
        if self.patch_size < 16:
            problems.append(f"patch_size must be ≥ 16 px, got {self.patch_size}")
        if self.mpp <= 0:
            problems.append(f"mpp must be > 0, got {self.mpp}")
        if self.output_size is not None and self.output_size < 16:
            problems.append(f"output_size must be ≥ 16 px or null, got {self.output_size}")
        if self.stride < 1:
            problems.append(f"stride must be ≥ 1 px, got {self.stride}")
        if not 0 <= self.min_tissue <= 1:
            problems.append(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.level < 0:
            problems.append(f"level must be ≥ 0, got {self.level}")
        if self.rule not in RULES:
            problems.append(f"rule must be one of {RULES}, got {self.rule!r}")
        if not 0 <= self.lower <= self.upper <= 1:
            problems.append(f"need 0 ≤ lower ≤ upper ≤ 1, got lower {self.lower}, upper {self.upper}")
        if self.max_patches_per_slide is not None and self.max_patches_per_slide < 1:
            problems.append(f"max_patches_per_slide must be ≥ 1 or null, got {self.max_patches_per_slide}")
        if self.max_crops < 1:
            problems.append(f"max_crops must be ≥ 1, got {self.max_crops}")
        if not 1 <= self.crop_min <= self.crop_max:
            problems.append(f"need 1 ≤ crop_min ≤ crop_max, got {self.crop_min}, {self.crop_max}")
        s = self.split
        if min(s.train, s.val, s.test) < 0 or s.train + s.val + s.test <= 0:
            problems.append(f"split fractions must be ≥ 0 with a positive sum, got {s}")
        if self.crop_bank.per_type < 1 or self.crop_bank.size < 4:
            problems.append(f"crop_bank needs per_type ≥ 1 and size ≥ 4, got {self.crop_bank}")
        if problems:
            raise ConfigError("patches: " + "; ".join(problems))

    @property
    def size(self) -> int:
        """Side (px) of the stored images."""
        return int(self.output_size or self.patch_size)

    @property
    def crop_range(self) -> tuple[int, int]:
        """``(min, max)`` crop side in stored-image px (the configured range scaled by
        ``size / patch_size`` and capped at the image side)."""
        f = self.size / self.patch_size
        lo = max(1, int(round(self.crop_min * f)))
        hi = min(self.size, max(lo, int(round(self.crop_max * f))))
        return min(lo, hi), hi

    @property
    def stored_mpp(self) -> float:
        """µm/px of the stored images (``mpp`` unless ``output_size`` resizes them)."""
        return self.mpp * self.patch_size / self.size

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["split"] = asdict(self.split)
        d["crop_bank"] = {**asdict(self.crop_bank), "splits": list(self.crop_bank.splits)}
        return d


# --- the heterogeneity rule -------------------------------------------------------------


def resolve_rule(rule: str, source: str) -> str:
    """``auto`` → ``bounds`` for annotation maps, ``entropy`` for k-means maps."""
    if rule != "auto":
        return rule
    return "bounds" if source == "annotation" else "entropy"


def entropy_bits(proportions: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of ``proportions`` ``(..., K)`` (0 log 0 = 0)."""
    p = np.asarray(proportions, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=-1)


def heterogeneous(proportions: np.ndarray, rule: str, lower: float = 0.2, upper: float = 0.8,
                  min_entropy: float = 0.7) -> np.ndarray:
    """Which rows of ``proportions`` ``(N, K)`` (tissue-type area fractions summing to 1,
    background excluded) pass ``rule`` (``bounds`` or ``entropy``); bool ``(N,)``.

    Rows with no tissue (all zeros) never pass.
    """
    p = np.atleast_2d(np.asarray(proportions, dtype=np.float64))
    has_tissue = p.sum(axis=1) > _EPS
    if rule == "bounds":
        ok = (p.max(axis=1) <= upper + _EPS) & ((p >= lower - _EPS).sum(axis=1) >= 2)
    elif rule == "entropy":
        ok = entropy_bits(p) >= min_entropy - _EPS
    else:
        raise ConfigError(f"patches.rule: expected bounds or entropy here, got {rule!r}")
    return ok & has_tissue


# --- window statistics on the map raster ---------------------------------------------------


def window_areas(labels2d: np.ndarray, cell_level0: float, coords: np.ndarray, size_level0: float,
                 num_labels: int | None = None) -> np.ndarray:
    """Area (in cells²) of each label inside each square window; float64 ``(N, num_labels)``.

    ``coords`` are level-0 ``(x, y)`` top-left corners, windows ``size_level0`` px wide.
    Cells are weighted by the exact area they share with the window (the bilinear
    interpolation of a summed-area table is exact for a piecewise-constant raster); the
    raster is extended with background where a window leaves it.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    num_labels = int(num_labels or (int(labels2d.max()) + 1 if labels2d.size else 1))
    out = np.zeros((len(coords), num_labels), dtype=np.float64)
    if len(coords) == 0:
        return out
    u0, v0 = coords[:, 0] / cell_level0, coords[:, 1] / cell_level0
    side = size_level0 / cell_level0
    u1, v1 = u0 + side, v0 + side
    h, w = labels2d.shape
    hp = max(h, int(math.ceil(v1.max())))
    wp = max(w, int(math.ceil(u1.max())))
    padded = np.zeros((hp, wp), dtype=labels2d.dtype)
    padded[:h, :w] = labels2d
    for value in np.unique(padded):
        sat = np.zeros((hp + 1, wp + 1), dtype=np.float64)
        np.cumsum(np.cumsum(padded == value, axis=0), axis=1, out=sat[1:, 1:])
        area = _sat_at(sat, v1, u1) - _sat_at(sat, v0, u1) - _sat_at(sat, v1, u0) + _sat_at(sat, v0, u0)
        if value < num_labels:
            out[:, int(value)] = np.maximum(area, 0.0)
    return out


def _sat_at(sat: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The continuous summed area up to (y, x) in cell units (bilinear in each cell)."""
    hp, wp = sat.shape[0] - 1, sat.shape[1] - 1
    y = np.clip(y, 0, hp)
    x = np.clip(x, 0, wp)
    i = np.minimum(np.floor(y).astype(np.int64), hp - 1)
    j = np.minimum(np.floor(x).astype(np.int64), wp - 1)
    fy, fx = y - i, x - j
    return (sat[i, j] * (1 - fy) * (1 - fx) + sat[i + 1, j] * fy * (1 - fx)
            + sat[i, j + 1] * (1 - fy) * fx + sat[i + 1, j + 1] * fy * fx)


def tissue_and_proportions(areas: np.ndarray, window_cells: float) -> tuple[np.ndarray, np.ndarray]:
    """From :func:`window_areas` rows: tissue fraction ``(N,)`` of the window and tissue-type
    proportions ``(N, K-1)`` over the tissue area (background, column 0, excluded)."""
    tissue = areas[:, 1:].sum(axis=1)
    frac = tissue / window_cells
    with np.errstate(divide="ignore", invalid="ignore"):
        props = np.where(tissue[:, None] > _EPS, areas[:, 1:] / tissue[:, None], 0.0)
    return frac, props


# --- candidate windows and the patch plan --------------------------------------------------


def patch_geometry(reader: SlideReader, cfg: PatchConfig) -> GridPlan:
    """Level to read, level-0 size and read size of a patch on this slide (SlideError when
    the slide is coarser than ``cfg.mpp``)."""
    tcfg = TilingConfig(mpp=cfg.mpp, tile_size=cfg.patch_size, overlap=0, min_tissue=0.0, mpp_tolerance=cfg.mpp_tolerance)
    return plan_grid(reader.dimensions, reader.level_downsamples, reader.mpp, tcfg, str(reader.path))


def candidate_coords(dimensions: tuple[int, int], size_level0: float, stride_level0: float) -> np.ndarray:
    """Level-0 ``(x, y)`` int64 ``(N, 2)`` of windows fully inside the slide, row-major."""
    w, h = dimensions
    cols = int(math.floor((w - size_level0) / stride_level0)) + 1 if w >= size_level0 else 0
    rows = int(math.floor((h - size_level0) / stride_level0)) + 1 if h >= size_level0 else 0
    xs = np.floor(np.arange(cols) * stride_level0).astype(np.int64)
    ys = np.floor(np.arange(rows) * stride_level0).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).reshape(-1, 2)


def select_spread(coords: np.ndarray, size_level0: float, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``n`` windows: seeded random order, non-overlapping windows first
    (so a capped selection spreads over the slide), then the others; sorted ascending."""
    m = len(coords)
    if n is None or m <= n:
        return np.arange(m)
    order = rng.permutation(m)
    taken: list[int] = []
    rest: list[int] = []
    pos = np.asarray(coords, dtype=np.float64)
    chosen = np.empty((0, 2))
    for i in order:
        if len(taken) == n:
            break
        if len(chosen) and (np.abs(chosen - pos[i]) < size_level0).all(axis=1).any():
            rest.append(int(i))
            continue
        taken.append(int(i))
        chosen = pos[taken]
    if len(taken) < n:
        seen = set(taken) | set(rest)
        rest += [int(i) for i in order if int(i) not in seen]
        taken += rest[: n - len(taken)]
    return np.sort(np.asarray(taken, dtype=np.int64))


@dataclass
class PatchPlan:
    """Kept windows of one slide. ``coords`` level-0 ``(x, y)`` int64 ``(n, 2)``;
    ``proportions`` float ``(n, K)`` at the rule's map level; ``tissue`` ``(n,)``. ``counts``:
    candidate, tissue, heterogeneous and kept windows, and ``size_level0``, the windows' side in
    level-0 px (which windows overlap: the evaluation's k-NN radii skip overlapping patches)."""

    slide_id: str
    geometry: GridPlan
    rule: str
    coords: np.ndarray
    proportions: np.ndarray
    tissue: np.ndarray
    counts: dict[str, int | float]

    def __len__(self) -> int:
        return len(self.coords)


def plan_patches(tmap: MapStore, dimensions: tuple[int, int], geometry: GridPlan, cfg: PatchConfig) -> PatchPlan:
    """Candidate windows → tissue filter → heterogeneity rule → per-slide cap (see module doc)."""
    if cfg.level >= tmap.map.shape[0]:
        raise ConfigError(f"patches.level {cfg.level}: map {tmap.path} has only {tmap.map.shape[0]} level(s)")
    size_l0 = geometry.tile_size_level0
    stride_l0 = cfg.stride * size_l0 / cfg.patch_size
    coords = candidate_coords(dimensions, size_l0, stride_l0)
    cell = tmap.cell_level0
    window_cells = (size_l0 / cell) ** 2
    level_map = tmap.map[cfg.level]
    n_labels = max(tmap.levels[cfg.level] + 1, int(level_map.max()) + 1 if level_map.size else 1)
    areas = window_areas(level_map, cell, coords, size_l0, n_labels)
    frac, props = tissue_and_proportions(areas, window_cells)
    tissue_ok = (frac >= cfg.min_tissue - _EPS) & (frac > _EPS)
    rule = resolve_rule(cfg.rule, tmap.source)
    het = tissue_ok & heterogeneous(props, rule, cfg.lower, cfg.upper, cfg.min_entropy)
    idx = np.flatnonzero(het)
    rng = np.random.default_rng([cfg.seed, _slide_seed(tmap.slide_id)])
    pick = idx[select_spread(coords[idx], size_l0, cfg.max_patches_per_slide, rng)]
    counts = {"candidates": len(coords), "tissue": int(tissue_ok.sum()), "heterogeneous": int(het.sum()), "kept": len(pick),
              "size_level0": round(float(size_l0), 4)}
    return PatchPlan(tmap.slide_id, geometry, rule, coords[pick], props[pick], frac[pick], counts)


def _slide_seed(slide_id: str) -> int:
    return zlib.crc32(slide_id.encode())


# --- pixels, map and crops of one patch --------------------------------------------------------


def patch_labels(labels2d: np.ndarray, cell_level0: float, x: float, y: float, size_level0: float, out_size: int) -> np.ndarray:
    """The map window at image resolution: uint16 ``(out_size, out_size)``, nearest neighbour
    at pixel centres (cells outside the raster are background)."""
    centres = (np.arange(out_size) + 0.5) * (size_level0 / out_size)
    cols = np.floor((x + centres) / cell_level0).astype(np.int64)
    rows = np.floor((y + centres) / cell_level0).astype(np.int64)
    h, w = labels2d.shape
    out = np.zeros((out_size, out_size), dtype=np.uint16)
    rin, cin = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out[np.ix_(rin, cin)] = labels2d[np.ix_(rows[rin], cols[cin])]
    return out


def read_patch(reader: SlideReader, geometry: GridPlan, x: int, y: int, out_size: int) -> np.ndarray:
    """uint8 ``(out_size, out_size, 3)``: one read at the planned level, one resize."""
    rs = geometry.read_size
    img = reader.read_region((int(x), int(y)), geometry.read_level, (rs, rs))
    if rs != out_size:
        interp = cv2.INTER_AREA if rs > out_size else cv2.INTER_LINEAR
        img = cv2.resize(img, (out_size, out_size), interpolation=interp)
    return img


def sample_crops(labels: np.ndarray, max_crops: int, crop_range: tuple[int, int],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One square crop per tissue region of ``labels`` ``(S, S)`` (largest regions first).

    Returns ``boxes`` int32 ``(C, 3)`` = (y0, x0, side), ``crop_labels`` uint16 ``(C,)``,
    ``valid`` bool ``(C,)`` with ``C = max_crops``. The side is drawn uniformly from
    ``crop_range`` (inclusive) and clipped to the largest square inside the region; a region
    where not even ``crop_range[0]`` fits keeps its label with ``valid`` False.
    """
    boxes = np.zeros((max_crops, 3), dtype=np.int32)
    crop_labels = np.zeros(max_crops, dtype=np.uint16)
    valid = np.zeros(max_crops, dtype=bool)
    values, counts = np.unique(labels, return_counts=True)
    keep = values > 0
    values, counts = values[keep], counts[keep]
    order = np.lexsort((values, -counts))[:max_crops]
    lo, hi = crop_range
    for slot, value in enumerate(values[order]):
        crop_labels[slot] = value
        mask = labels == value
        # Work inside the region's bounding box: same squares, far fewer pixels.
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r0, c0 = int(rows[0]), int(cols[0])
        sub = mask[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
        side = int(rng.integers(lo, hi + 1))
        if not square_fits(sub, side).any():
            side = largest_square(sub)
        if side < lo:
            continue
        pos = sample_square(sub, side, rng)
        if pos is None:  # cannot happen after the fit check; keep the slot invalid if it does
            continue
        boxes[slot] = (r0 + pos[0], c0 + pos[1], side)
        valid[slot] = True
    return boxes, crop_labels, valid


@dataclass
class Patch:
    """One training patch: ``image`` uint8 (S, S, 3), ``labels`` uint16 (S, S) finest map,
    crops as in :func:`sample_crops`, ``coords`` level-0 (x, y)."""

    image: np.ndarray
    labels: np.ndarray
    crop_boxes: np.ndarray
    crop_labels: np.ndarray
    crop_valid: np.ndarray
    coords: tuple[int, int]


def crop_rng(seed: int, slide_id: str, index: int) -> np.random.Generator:
    """The crop RNG of patch ``index`` of a slide: the same whether slides are processed
    together or one by one."""
    return np.random.default_rng([seed, _slide_seed(slide_id), index])


def iter_patches(reader: SlideReader, tmap: MapStore, plan: PatchPlan, cfg: PatchConfig) -> Iterator[Patch]:
    """Pixels, map and crops of every planned patch, in plan order (one at a time)."""
    size = cfg.size
    size_l0 = plan.geometry.tile_size_level0
    for k, (x, y) in enumerate(plan.coords):
        image = read_patch(reader, plan.geometry, int(x), int(y), size)
        labels = patch_labels(tmap.map[0], tmap.cell_level0, float(x), float(y), size_l0, size)
        boxes, crop_labels, valid = sample_crops(labels, cfg.max_crops, cfg.crop_range, crop_rng(cfg.seed, plan.slide_id, k))
        yield Patch(image, labels, boxes, crop_labels, valid, (int(x), int(y)))
