"""Small synthetic nuclei datasets in the published layouts (CoNIC, PanNuke, folder).

Each image is a pink background with non-overlapping ellipses ("nuclei"), each of a known
class drawn in a colour of its class, so tests can check readers and stores exactly. The
writers return the ground truth: one :class:`Truth` per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKGROUND = (236, 184, 208)  # pink (eosin)
# Nucleus colour per class id (shades of haematoxylin purple, distinct per class).
CLASS_COLOURS = [(0, 0, 0), (70, 30, 120), (110, 40, 160), (40, 20, 90), (140, 70, 170), (90, 60, 200), (60, 50, 140)]


@dataclass
class Truth:
    """Ground truth of one image: ``instances`` int32 (H, W) ids 1..N, ``classes`` id → class."""

    name: str
    image: np.ndarray
    instances: np.ndarray
    classes: dict[int, int]
    tissue: str

    @property
    def semantic(self) -> np.ndarray:
        lut = np.zeros(len(self.classes) + 1, dtype=np.uint8)
        for i, c in self.classes.items():
            lut[i] = c
        return lut[self.instances]


def draw_nuclei(size: int, n_classes: int, rng: np.random.Generator, count: int = 12,
                radius: tuple[int, int] = (5, 11)) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One image uint8 (size, size, 3), its instances int32 and ``{id: class}`` (classes 1..n_classes-1)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    instances = np.zeros((size, size), dtype=np.int32)
    classes: dict[int, int] = {}
    centres: list[tuple[int, int, int]] = []
    for _ in range(count * 20):
        if len(centres) == count:
            break
        a, b = (int(v) for v in rng.integers(radius[0], radius[1] + 1, 2))
        cy, cx = (int(v) for v in rng.integers(radius[1] + 1, size - radius[1] - 1, 2))
        # Keep a gap of 2 px between nuclei so each stays one connected component.
        if any(np.hypot(cy - y, cx - x) < max(a, b) + r + 2 for y, x, r in centres):
            continue
        centres.append((cy, cx, max(a, b)))
        k = len(centres)
        cls = 1 + (k - 1) % (n_classes - 1)
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(instances, (cx, cy), (a, b), angle, 0, 360, k, -1)
        classes[k] = cls
    colours = np.array(CLASS_COLOURS[: n_classes] + [(80, 40, 130)] * max(0, n_classes - len(CLASS_COLOURS)), dtype=np.uint8)
    lut = np.zeros(len(classes) + 1, dtype=np.int64)
    for i, c in classes.items():
        lut[i] = c
    fg = instances > 0
    image[fg] = colours[lut[instances[fg]]]
    noise = rng.normal(0, 4, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, instances, classes


def _truths(n: int, size: int, seed: int, n_classes: int, tissues: list[str]) -> list[Truth]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, inst, cls = draw_nuclei(size, n_classes, rng)
        out.append(Truth(f"{i:05d}", image, inst, cls, tissues[i % len(tissues)]))
    return out


def write_conic(folder: str | Path, n: int = 4, size: int = 256, seed: int = 0, sources: int = 2) -> list[Truth]:
    """A CoNIC release folder: images.npy, labels.npy (instance, class), patch_info.csv and
    counts.csv; patches belong to ``sources`` source images (names ``img<k>-<i>``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truths = _truths(n, size, seed, 7, ["unknown"])
    for i, t in enumerate(truths):
        t.name = f"img{i % sources}-{i:04d}"
    np.save(folder / "images.npy", np.stack([t.image for t in truths]))
    np.save(folder / "labels.npy", np.stack([np.stack([t.instances, t.semantic.astype(np.int32)], axis=-1) for t in truths]))
    (folder / "patch_info.csv").write_text("patch_info\n" + "".join(f"{t.name}\n" for t in truths))
    header = "neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective\n"
    rows = ["," .join(str(sum(1 for c in t.classes.values() if c == k)) for k in range(1, 7)) for t in truths]
    (folder / "counts.csv").write_text(header + "\n".join(rows) + "\n")
    return truths


PANNUKE_TISSUES = ["Breast", "Colon", "Kidney"]


def write_pannuke(folder: str | Path, n: int = 4, size: int = 256, seed: int = 0, fold: int = 1) -> tuple[Path, list[Truth]]:
    """A PanNuke fold in the release's nesting (``Fold k/images/foldk/images.npy``...).

    Instance ids restart at 1 in every class channel, as in the release. Returns the fold
    folder and the truth (instance ids 1..N over all channels).
    """
    root = Path(folder) / f"Fold {fold}"
    truths = _truths(n, size, seed, 6, PANNUKE_TISSUES)
    masks = np.zeros((n, size, size, 6), dtype=np.float64)
    for k, t in enumerate(truths):
        for c in range(1, 6):
            ids = sorted(i for i, cls in t.classes.items() if cls == c)
            for j, i in enumerate(ids, start=1):
                masks[k, ..., c - 1][t.instances == i] = j
        masks[k, ..., 5] = (t.instances == 0).astype(np.float64)
    (root / "images" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    (root / "masks" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    np.save(root / "images" / f"fold{fold}" / "images.npy", np.stack([t.image for t in truths]).astype(np.float64))
    np.save(root / "images" / f"fold{fold}" / "types.npy", np.array([t.tissue for t in truths]))
    np.save(root / "masks" / f"fold{fold}" / "masks.npy", masks)
    return root, truths


def write_folder(folder: str | Path, n: int = 4, size: int = 256, seed: int = 0, ext: str = "png",
                 tissues: tuple[str, ...] = ("colon", "breast")) -> list[Truth]:
    """A generic folder: images/<name>.png, instances/<name>.<ext>, classes/<name>.<ext>, tissue.tsv."""
    import tifffile
    from PIL import Image

    folder = Path(folder)
    truths = _truths(n, size, seed, 7, list(tissues))
    for sub in ("images", "instances", "classes"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for t in truths:
        Image.fromarray(t.image).save(folder / "images" / f"{t.name}.png")
        for sub, arr in (("instances", t.instances.astype(np.uint16)), ("classes", t.semantic)):
            p = folder / sub / f"{t.name}.{ext}"
            if ext == "npy":
                np.save(p, arr)
            elif ext in ("tif", "tiff"):
                tifffile.imwrite(p, arr)
            else:
                Image.fromarray(arr).save(p)
    (folder / "tissue.tsv").write_text("name\ttissue\n" + "".join(f"{t.name}\t{t.tissue}\n" for t in truths))
    return truths


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two instance maps hold the same nuclei (ids may differ)."""
    if ((a > 0) != (b > 0)).any():
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist(), strict=True))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
