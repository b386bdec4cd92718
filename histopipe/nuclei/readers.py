"""Readers of the published nuclei datasets, one sample at a time.

Layouts:

- ``conic``: the CoNIC / Lizard challenge release, a folder with ``images.npy`` uint8
  (N, H, W, 3), ``labels.npy`` (N, H, W, 2) (channel 0 instance ids, channel 1 class ids
  0..6, see :data:`CONIC_CLASSES`), optional ``patch_info.csv`` (one name per patch,
  ``<source image>-<patch>``) and ``counts.csv`` (ignored: counts are recomputed).
- ``pannuke``: one fold folder, searched recursively (the release nests
  ``Fold 1/images/fold1/images.npy``) for ``images.npy`` float64 (N, H, W, 3) in 0..255,
  ``masks.npy`` (N, H, W, 6) whose channels 0..4 hold the instance ids of neoplastic,
  inflammatory, connective, dead and epithelial nuclei (ids unique per channel only) and
  channel 5 background, and ``types.npy`` (N,) tissue names.
- ``folder``: ``images/<name>.png``, ``instances/<name>.(png|tif|tiff|npy)``,
  ``classes/<name>.(png|tif|tiff|npy)`` (per-pixel class map), optional ``tissue.tsv``
  (``name<TAB>tissue`` per line) and ``class_names.txt`` (one name per line, background
  first; default the CoNIC classes).

The ``.npy`` files are memory-mapped, so a 2.5 GB PanNuke fold is streamed, never loaded.
Every sample's instances are relabelled to 1..N and its semantic map is rebuilt from the
per-instance majority class, so the two always agree.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histopipe.errors import HistopipeError
from histopipe.nuclei.labels import (
    CONIC_CLASSES,
    PANNUKE_CLASSES,
    instance_classes,
    relabel,
    semantic_map,
)

log = logging.getLogger(__name__)

FORMATS = ("conic", "pannuke", "folder")
_LABEL_EXTS = (".png", ".tif", ".tiff", ".npy")


@dataclass
class NucleiSample:
    """One labelled image: ``image`` uint8 (H, W, 3), ``instances`` int32 (H, W) 1..N,
    ``semantic`` uint8 (H, W) class ids, ``tissue`` name ("unknown" when the dataset has
    none). ``group`` names the source image that overlapping patches share (splits keep a
    group together); it defaults to ``name``."""

    name: str
    image: np.ndarray
    instances: np.ndarray
    semantic: np.ndarray
    tissue: str = "unknown"
    group: str = ""

    def __post_init__(self) -> None:
        self.group = self.group or self.name


def _load(path: Path, small: bool = False) -> np.ndarray:
    """Memory-map a .npy file; ``small`` files (PanNuke's types.npy, an object array in some
    copies, which cannot be mapped) are loaded whole."""
    try:
        if small:
            return np.load(path, allow_pickle=True)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise HistopipeError(f"{path}: cannot read: {err}") from None


def _need(path: Path) -> Path:
    if not path.is_file():
        raise HistopipeError(f"{path}: file not found")
    return path


def _sample(name: str, image: np.ndarray, instances: np.ndarray, classes: np.ndarray, n_classes: int,
            where: str, tissue: str = "unknown", group: str = "") -> NucleiSample:
    """Check one sample and make its instances and semantic map consistent."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise HistopipeError(f"{where}: image shape {image.shape} is not (H, W, 3)")
    if instances.shape != image.shape[:2] or classes.shape != image.shape[:2]:
        raise HistopipeError(f"{where}: label shape {instances.shape}/{classes.shape} does not match image {image.shape[:2]}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() >= n_classes):
        raise HistopipeError(f"{where}: class ids {int(classes.min())}..{int(classes.max())} out of range 0..{n_classes - 1}")
    instances = relabel(np.asarray(instances).astype(np.int64))
    of = instance_classes(instances, classes)
    unclassed = [i for i, c in of.items() if c == 0]
    if unclassed:
        # A nucleus without a class has no place in the semantic map: drop it from both.
        log.info("%s: %d nuclei without a class dropped", where, len(unclassed))
        instances = relabel(np.where(np.isin(instances, unclassed), 0, instances))
        of = instance_classes(instances, classes)
    return NucleiSample(name, image, instances, semantic_map(instances, of), tissue, group)


# --- CoNIC / Lizard -----------------------------------------------------------------------------


def _conic_names(path: Path, n: int) -> list[str]:
    info = path / "patch_info.csv"
    if not info.is_file():
        return [f"{i:05d}" for i in range(n)]
    with open(info, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if rows and rows[0][0].strip().lower() in ("patch_info", "name", "info"):
        rows = rows[1:]
    names = [r[0].strip() for r in rows]
    if len(names) != n:
        raise HistopipeError(f"{info}: {len(names)} rows for {n} patches in images.npy")
    return names


def _conic_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    images = _load(_need(path / "images.npy"))
    labels = _load(_need(path / "labels.npy"))
    if images.ndim != 4 or images.shape[3] != 3:
        raise HistopipeError(f"{path / 'images.npy'}: shape {images.shape} is not (N, H, W, 3)")
    if labels.shape[:3] != images.shape[:3] or labels.ndim != 4 or labels.shape[3] != 2:
        raise HistopipeError(f"{path / 'labels.npy'}: shape {labels.shape} does not match images {images.shape[:3]} + 2 channels")
    return images, labels


def read_conic(path: str | Path) -> Iterator[NucleiSample]:
    """Samples of a CoNIC / Lizard release folder (tissue "unknown": the release has none)."""
    path = Path(path)
    images, labels = _conic_arrays(path)
    names = _conic_names(path, len(images))
    for i, name in enumerate(names):
        lab = np.asarray(labels[i])
        yield _sample(name, images[i], lab[..., 0], lab[..., 1], len(CONIC_CLASSES),
                      f"{path / 'labels.npy'}[{i}]", group=name.rsplit("-", 1)[0])


# --- PanNuke ----------------------------------------------------------------------------------


def _find(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise HistopipeError(f"{path}: PanNuke fold folder not found")
    hits = sorted(path.rglob(name))
    if not hits:
        raise HistopipeError(f"{path}: no {name} in the PanNuke fold folder")
    if len(hits) > 1:
        raise HistopipeError(f"{path}: {len(hits)} files named {name} ({', '.join(map(str, hits))}); give one fold")
    return hits[0]


def _pannuke_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    ip, mp, tp = _find(path, "images.npy"), _find(path, "masks.npy"), _find(path, "types.npy")
    images, masks, types = _load(ip), _load(mp), _load(tp, small=True)
    if images.ndim != 4 or images.shape[3] != 3:
        raise HistopipeError(f"{ip}: shape {images.shape} is not (N, H, W, 3)")
    if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] != 6:
        raise HistopipeError(f"{mp}: shape {masks.shape} does not match images {images.shape[:3]} + 6 channels")
    if types.shape != (len(images),):
        raise HistopipeError(f"{tp}: shape {types.shape} does not match {len(images)} images")
    return images, masks, types, mp


def pannuke_instances(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instances int64 (H, W) with ids unique across channels, and class ids uint8 (H, W),
    from one PanNuke mask (H, W, 6) (class of channel c = c + 1; channel 5 is background)."""
    inst = np.zeros(mask.shape[:2], dtype=np.int64)
    cls = np.zeros(mask.shape[:2], dtype=np.uint8)
    offset = 0
    for c in range(5):
        ch = np.asarray(mask[..., c]).astype(np.int64)
        on = ch > 0
        if on.any():
            # Ids repeat across channels: shift each channel past the previous ones.
            inst[on] = ch[on] + offset
            cls[on] = c + 1
            offset += int(ch.max())
    return inst, cls


def read_pannuke(path: str | Path) -> Iterator[NucleiSample]:
    """Samples of one PanNuke fold folder, tissue from ``types.npy``."""
    path = Path(path)
    images, masks, types, mp = _pannuke_arrays(path)
    for i in range(len(images)):
        inst, cls = pannuke_instances(np.asarray(masks[i]))
        name = f"{i:05d}"
        yield _sample(name, images[i], inst, cls, len(PANNUKE_CLASSES), f"{mp}[{i}]", str(types[i]))


# --- generic folder ----------------------------------------------------------------------------


def _read_label(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as err:
        raise HistopipeError(f"{path}: cannot read: {err}") from None


def _label_file(folder: Path, name: str) -> Path:
    for ext in _LABEL_EXTS:
        p = folder / f"{name}{ext}"
        if p.is_file():
            return p
    raise HistopipeError(f"{folder / name}.(png|tif|tiff|npy): file not found")


def _folder_names(path: Path) -> list[str]:
    images = path / "images"
    if not images.is_dir():
        raise HistopipeError(f"{images}: folder not found")
    names = sorted(p.stem for p in images.glob("*.png"))
    if not names:
        raise HistopipeError(f"{images}: no .png images")
    return names


def _folder_tissue(path: Path) -> dict[str, str]:
    tsv = path / "tissue.tsv"
    if not tsv.is_file():
        return {}
    out = {}
    for lineno, line in enumerate(tsv.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise HistopipeError(f"{tsv}:{lineno}: expected 'name<TAB>tissue'")
        if (parts[0], parts[1]) == ("name", "tissue"):
            continue
        out[parts[0].strip()] = parts[1].strip()
    return out


def read_folder(path: str | Path) -> Iterator[NucleiSample]:
    """Samples of a generic folder (``images/``, ``instances/``, ``classes/``), in name order."""
    from PIL import Image

    path = Path(path)
    names = _folder_names(path)
    tissue = _folder_tissue(path)
    n_classes = len(class_names("folder", path))
    for name in names:
        ip = path / "images" / f"{name}.png"
        try:
            with Image.open(ip) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as err:
            raise HistopipeError(f"{ip}: cannot read: {err}") from None
        inst_p, cls_p = _label_file(path / "instances", name), _label_file(path / "classes", name)
        inst, cls = _read_label(inst_p), _read_label(cls_p)
        for p, a in ((inst_p, inst), (cls_p, cls)):
            if a.shape != image.shape[:2]:
                raise HistopipeError(f"{p}: shape {a.shape} does not match image {image.shape[:2]} of {ip}")
        yield _sample(name, image, inst, cls, n_classes, str(cls_p), tissue.get(name, "unknown"))


# --- dispatch ----------------------------------------------------------------------------------

READERS: dict[str, Callable[[Path], Iterator[NucleiSample]]] = {
    "conic": read_conic,
    "pannuke": read_pannuke,
    "folder": read_folder,
}


def class_names(fmt: str, path: str | Path | None = None) -> tuple[str, ...]:
    """Class names of a format (index = class id, background first). A folder dataset may
    name its own classes in ``class_names.txt``; otherwise it uses the CoNIC classes."""
    if fmt == "conic":
        return CONIC_CLASSES
    if fmt == "pannuke":
        return PANNUKE_CLASSES
    if fmt == "folder":
        f = Path(path) / "class_names.txt" if path is not None else None
        if f is not None and f.is_file():
            names = tuple(s.strip() for s in f.read_text().splitlines() if s.strip())
            if len(names) < 2 or names[0] != "background":
                raise HistopipeError(f"{f}: expected 'background' then at least one class, one per line")
            return names
        return CONIC_CLASSES
    raise HistopipeError(f"unknown nuclei dataset format {fmt!r} (choose {', '.join(FORMATS)})")


def sample_groups(fmt: str, path: str | Path) -> list[str]:
    """The group of every sample, in reading order, without reading pixels (for splits)."""
    path = Path(path)
    if fmt == "conic":
        images, _ = _conic_arrays(path)
        return [n.rsplit("-", 1)[0] for n in _conic_names(path, len(images))]
    if fmt == "pannuke":
        return [f"{i:05d}" for i in range(len(_pannuke_arrays(path)[0]))]
    if fmt == "folder":
        return _folder_names(path)
    raise HistopipeError(f"unknown nuclei dataset format {fmt!r} (choose {', '.join(FORMATS)})")


def read_samples(fmt: str, path: str | Path) -> Iterator[NucleiSample]:
    """Samples of a dataset of format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in READERS:
        raise HistopipeError(f"unknown nuclei dataset format {fmt!r} (choose {', '.join(FORMATS)})")
    return READERS[fmt](Path(path))
