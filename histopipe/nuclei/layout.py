"""Point-map layouts from tissue type + cell-type counts (HistoSmith, paper 000).

``LayoutModel`` is fitted on the training point maps: per tissue, the cell-type count vectors
seen (drawn from when no counts are given) and a coarse position histogram per class
(proposals come from it, so e.g. rim-heavy classes stay at the rim); per class pair, a
minimum centre spacing = a low quantile of the nearest-neighbour distances seen between the
two classes. Sampling is a hard-core (Matérn-type) sequential placement: a proposal closer
than the spacing to a placed nucleus is rejected, so nuclei do not overlap; the counts are
always met exactly (after ``max_tries`` rejections a nucleus's spacing is relaxed by 10 %,
never below 1 px, i.e. never two nuclei on one pixel).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from histopipe.atomic import atomic_write_text
from histopipe.errors import HistopipeError
from histopipe.nuclei.labels import points_from_raster
from histopipe.nuclei.settings import NucleiLayoutSettings
from histopipe.nuclei.store import SPLITS, open_nuclei_store


def parse_counts(text: str, class_names: list[str] | tuple[str, ...] | None = None) -> dict[str, int]:
    """``"neutrophil=12,epithelial=80"`` → {"neutrophil": 12, "epithelial": 80}.

    With ``class_names`` (background first), unknown or background names are errors that list the known ones.
    """
    counts: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise HistopipeError(f"counts {text!r}: {item!r} is not name=count")
        try:
            n = int(value)
        except ValueError:
            raise HistopipeError(f"counts {text!r}: count of {name!r} is not an integer: {value!r}") from None
        if n < 0:
            raise HistopipeError(f"counts {text!r}: count of {name!r} is negative")
        if name in counts:
            raise HistopipeError(f"counts {text!r}: {name!r} given twice")
        counts[name] = n
    if class_names is not None:
        check_class_names(counts, class_names)
    return counts


def check_class_names(counts: dict[str, int], class_names) -> None:
    known = list(class_names)[1:]
    unknown = [n for n in counts if n not in known]
    if unknown:
        raise HistopipeError(f"unknown nucleus classes {unknown}; known classes: {known}")


class LayoutModel:
    """Per-tissue counts and class position densities, per-pair minimum spacing (px)."""

    def __init__(self, class_names, tissue_names, size: int, counts: dict, density: dict, spacing, settings: NucleiLayoutSettings):
        self.class_names, self.tissue_names = list(class_names), list(tissue_names)
        self.size = int(size)
        self.counts = {t: [list(map(int, c)) for c in v] for t, v in counts.items()}  # tissue → count vectors (classes 1..C-1)
        self.density = {t: {int(c): np.asarray(g, float) for c, g in d.items()} for t, d in density.items()}  # tissue → class → (G, G)
        self.spacing = np.asarray(spacing, float)  # (C, C) px
        self.settings = settings

    @classmethod
    def fit(cls, samples, class_names, tissue_names, size: int, settings: NucleiLayoutSettings | None = None) -> LayoutModel:
        """Fit from ``samples``: iterable of (points (N, 3) or raster (S, S), tissue id)."""
        s = settings or NucleiLayoutSettings()
        k, g = len(class_names), s.density_grid
        counts: dict[str, list] = {t: [] for t in tissue_names}
        hist = {t: np.ones((k, g, g)) for t in tissue_names}  # +1: no cell is impossible
        nn_dist: dict[tuple[int, int], list[float]] = {}
        for pts, tissue in samples:
            pts = np.asarray(pts)
            pts = points_from_raster(pts) if pts.ndim == 2 and pts.shape[1] != 3 else pts.reshape(-1, 3)
            name = tissue_names[int(tissue)]
            counts[name].append(np.bincount(pts[:, 2], minlength=k)[1:k].tolist())
            cells = np.clip(pts[:, :2] * g // size, 0, g - 1)
            np.add.at(hist[name], (pts[:, 2], cells[:, 0], cells[:, 1]), 1)
            if len(pts) > 1:
                d = np.sqrt(((pts[:, None, :2] - pts[None, :, :2]) ** 2).sum(-1))
                np.fill_diagonal(d, np.inf)
                for i, ci in enumerate(pts[:, 2]):
                    for cj in np.unique(pts[:, 2]):
                        dj = d[i, pts[:, 2] == cj].min()
                        if np.isfinite(dj):
                            nn_dist.setdefault(tuple(sorted((int(ci), int(cj)))), []).append(float(dj))
        spacing = np.full((k, k), s.default_spacing)
        for (a, b), vals in nn_dist.items():
            spacing[a, b] = spacing[b, a] = float(np.quantile(vals, s.spacing_quantile))
        density = {t: {c: (h[c] / h[c].sum()).tolist() for c in range(1, k)} for t, h in hist.items()}
        return cls(class_names, tissue_names, size, counts, density, spacing, s)

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (atomically)."""
        data = {
            "class_names": self.class_names, "tissue_names": self.tissue_names, "size": self.size,
            "counts": self.counts, "spacing": self.spacing.tolist(), "settings": asdict(self.settings),
            "density": {t: {str(c): g.tolist() for c, g in d.items()} for t, d in self.density.items()},
        }
        atomic_write_text(Path(path), json.dumps(data))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LayoutModel:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise HistopipeError(f"{path}: cannot read a layout model ({err})") from None
        return cls(d["class_names"], d["tissue_names"], d["size"], d["counts"], d["density"], d["spacing"], NucleiLayoutSettings(**d["settings"]))

    def sample(self, tissue: str, counts: dict[str, int] | None = None, size: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """(N, 3) int64 rows (y, x, class) with exactly ``counts`` nuclei per class name.

        ``counts`` None draws a count vector of ``tissue`` seen in training. ``size`` (px)
        defaults to the training patch size; positions are scaled from the fitted density.
        """
        s = self.settings
        rng = rng if rng is not None else np.random.default_rng(s.seed)
        size = int(size or self.size)
        if tissue not in self.tissue_names:
            raise HistopipeError(f"unknown tissue {tissue!r}; known tissues: {self.tissue_names}")
        if counts is None:
            seen = self.counts.get(tissue) or [[0] * (len(self.class_names) - 1)]
            vec = seen[int(rng.integers(len(seen)))]
            counts = {self.class_names[i + 1]: int(n) for i, n in enumerate(vec)}
        check_class_names(counts, self.class_names)
        lo, hi = s.border, size - 1 - s.border
        if hi < lo or sum(counts.values()) > (hi - lo + 1) ** 2:
            raise HistopipeError(f"{sum(counts.values())} nuclei do not fit a {size} px patch with a {s.border} px border")
        classes = np.array([self.class_names.index(n) for n, c in counts.items() for _ in range(c)], np.int64)
        # Widest-spaced classes first: they are the hardest to fit once the patch fills up.
        order = np.argsort(-self.spacing[classes, classes] + rng.random(len(classes)) * 1e-3, kind="stable")
        placed = np.zeros((0, 3), np.int64)
        for c in classes[order]:
            yx = self._place(int(c), placed, tissue, size, lo, hi, rng)
            placed = np.vstack([placed, [[yx[0], yx[1], c]]])
        return placed

    def _place(self, c: int, placed: np.ndarray, tissue: str, size: int, lo: int, hi: int, rng) -> tuple[int, int]:
        s = self.settings
        grid = self.density[tissue][c]
        g = grid.shape[0]
        flat = grid.ravel() / grid.sum()
        need = self.spacing[c, placed[:, 2]] if len(placed) else np.zeros(0)
        relax = 1.0
        while True:
            cells = rng.choice(g * g, size=s.max_tries, p=flat)
            ys = ((cells // g) + rng.random(s.max_tries)) * size / g
            xs = ((cells % g) + rng.random(s.max_tries)) * size / g
            cand = np.stack([np.clip(ys.astype(int), lo, hi), np.clip(xs.astype(int), lo, hi)], 1)
            if not len(placed):
                return int(cand[0, 0]), int(cand[0, 1])
            d = np.sqrt(((cand[:, None] - placed[None, :, :2]) ** 2).sum(-1))
            ok = (d >= np.maximum(need * relax, 1.0)).all(1)
            if ok.any():
                i = int(np.argmax(ok))
                return int(cand[i, 0]), int(cand[i, 1])
            if relax * need.max() < 1.0:  # already at the 1-px floor: take any free pixel
                free = np.ones((size, size), bool)
                free[placed[:, 0], placed[:, 1]] = False
                ys, xs = np.nonzero(free[lo : hi + 1, lo : hi + 1])
                i = int(rng.integers(len(ys)))
                return int(ys[i] + lo), int(xs[i] + lo)
            relax *= 0.9


def fit_layout(store: str | Path, out_json: str | Path, settings: NucleiLayoutSettings | None = None) -> Path:
    """Fit a ``LayoutModel`` on the train split of Part A's nuclei store; write it as JSON."""
    g = open_nuclei_store(store)
    if "points" not in g:
        raise HistopipeError(f"{store}: an image-only nuclei store has no point maps to fit a layout on")
    rasters, tissue, split = g["points"], np.asarray(g["tissue"][:]), np.asarray(g["split"][:])
    attrs = dict(g.attrs)
    train = np.flatnonzero(split == SPLITS.index("train"))
    samples = ((points_from_raster(np.asarray(rasters[i])), int(tissue[i])) for i in train)
    model = LayoutModel.fit(samples, attrs["class_names"], attrs["tissue_names"], int(attrs["patch_size"]), settings)
    return model.save(out_json)
