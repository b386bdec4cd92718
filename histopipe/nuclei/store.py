"""The nuclei patch store: writing (streamed, atomic), building from a dataset sheet, reading.

Layout (zarr v3, one patch per chunk): ``image`` uint8 (N, S, S, 3); ``instances`` int32
(N, S, S) ids 1..n per patch; ``semantic`` uint8 (N, S, S) class ids; ``distance`` float16
(N, S, S) in [0, 1] (per-nucleus normalised EDT, paper 002); ``points`` uint8 (N, S, S)
class id at each nucleus centroid; ``tissue`` int16 (N,) index into ``tissue_names``;
``split`` uint8 (N,) 0 train / 1 test; ``name`` and ``source`` str (N,) (sample name and
dataset id). Attributes: ``class_names``, ``tissue_names``, ``patch_size``, ``labels``
(False for image-only stores, which hold only image, tissue, split, name and source),
``n_patches``, ``splits`` (patches per split) and ``nuclei`` (nuclei per class per split).

Samples are written one patch at a time into a temporary folder renamed onto the target
at the end (``histopipe.atomic``): a failed build leaves no store.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histopipe import __version__
from histopipe.atomic import atomic_path
from histopipe.config import section
from histopipe.errors import ConfigError, HistopipeError
from histopipe.nuclei.labels import centroids, distance_map, point_raster, relabel
from histopipe.nuclei.readers import NucleiSample, class_names, read_samples, sample_groups
from histopipe.nuclei.sheet import NucleiSource

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_LABEL_ARRAYS = (("instances", "int32"), ("semantic", "uint8"), ("distance", "float16"), ("points", "uint8"))


@dataclass(frozen=True)
class NucleiDataSettings:
    """Config section ``nuclei.data`` (see config.schema.yaml for units and meaning)."""

    patch_size: int = 256
    test_fraction: float = 0.2
    seed: int = 0
    wsi_mpp: float = 0.5
    wsi_tiles: int = 64

    @classmethod
    def from_config(cls, cfg: dict) -> NucleiDataSettings:
        """From a full validated config (``histopipe.config.load_config``)."""
        return section(cfg["nuclei"], "data", cls)


def cut_patches(sample: NucleiSample, size: int, where: str = "") -> Iterator[NucleiSample]:
    """Non-overlapping ``size`` px patches of a sample, row-major, named ``<name>_y<y>_x<x>``
    when the sample is larger (the remainder at the right/bottom is dropped). A sample
    smaller than ``size`` is an error naming it."""
    h, w = sample.image.shape[:2]
    if h < size or w < size:
        raise HistopipeError(f"{where or sample.name}: sample {sample.name!r} is {h}x{w} px, smaller than patch_size {size}")
    if (h, w) == (size, size):
        yield sample
        return
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            sl = (slice(y, y + size), slice(x, x + size))
            yield replace(sample, name=f"{sample.name}_y{y}_x{x}", image=sample.image[sl],
                          instances=relabel(sample.instances[sl]), semantic=sample.semantic[sl])


class NucleiStoreWriter:
    """Streams patches into a new store at ``path`` (atomic: nothing appears there until
    :meth:`close`; :meth:`abort`, or leaving the ``with`` block by an exception, drops it).

    ``tissue_names`` seeds the tissue index; new tissue names are appended as they come.
    ``labels=False`` writes an image-only store (unlabeled images, e.g. WSI tiles).
    """

    def __init__(self, path: str | Path, patch_size: int, class_names: Sequence[str],
                 tissue_names: Sequence[str] = (), labels: bool = True):
        self.path = Path(path)
        self.size = int(patch_size)
        self.class_names = tuple(class_names)
        self.tissue_names = list(tissue_names)
        self.labels = labels
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        s = self.size
        arrays = [("image", "uint8", (s, s, 3))] + ([(n, d, (s, s)) for n, d in _LABEL_ARRAYS] if labels else [])
        self._arrays = {n: self._root.create_array(n, shape=(0, *shape), dtype=d, chunks=(1, *shape))
                        for n, d, shape in arrays}
        self._capacity = 0
        self.n = 0
        self._tissue: list[int] = []
        self._split: list[int] = []
        self._name: list[str] = []
        self._source: list[str] = []
        self._nuclei = np.zeros((len(SPLITS), max(len(self.class_names), 1)), dtype=np.int64)
        self._open = True

    def __enter__(self) -> NucleiStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._open:
                self.close()
        else:
            self.abort(exc)

    def _grow(self) -> None:
        # Doubling keeps the number of metadata rewrites logarithmic in the patch count.
        self._capacity = max(8, 2 * self._capacity)
        for arr in self._arrays.values():
            arr.resize((self._capacity, *arr.shape[1:]))

    def _tissue_index(self, tissue: str) -> int:
        if tissue not in self.tissue_names:
            self.tissue_names.append(tissue)
        return self.tissue_names.index(tissue)

    def _row(self, split: str, tissue: str, name: str, source: str) -> int:
        if not self._open:
            raise HistopipeError(f"{self.path}: store writer already closed")
        if split not in SPLITS:
            raise ConfigError(f"{self.path}: unknown split {split!r} (choose {', '.join(SPLITS)})")
        if self.n == self._capacity:
            self._grow()
        self._tissue.append(self._tissue_index(tissue))
        self._split.append(SPLITS.index(split))
        self._name.append(name)
        self._source.append(source)
        self.n += 1
        return self.n - 1

    def add(self, sample: NucleiSample, split: str, source: str = "") -> int:
        """Write a labelled sample, cut into patches; returns the number of patches written."""
        if not self.labels:
            raise HistopipeError(f"{self.path}: image-only store; use add_image")
        n = 0
        for p in cut_patches(sample, self.size, source or sample.name):
            if p.semantic.size and int(p.semantic.max()) >= len(self.class_names):
                raise HistopipeError(f"{source}: sample {p.name!r}: class id {int(p.semantic.max())} beyond the store's classes {self.class_names}")
            pts = centroids(p.instances, p.semantic)
            i = self._row(split, p.tissue, p.name, source)
            a = self._arrays
            a["image"][i] = p.image
            a["instances"][i] = p.instances
            a["semantic"][i] = p.semantic
            a["distance"][i] = distance_map(p.instances).astype(np.float16)
            a["points"][i] = point_raster(pts, p.instances.shape)
            self._nuclei[SPLITS.index(split)] += np.bincount(pts[:, 2], minlength=self._nuclei.shape[1])[: self._nuclei.shape[1]]
            n += 1
        return n

    def add_image(self, image: np.ndarray, split: str = "train", tissue: str = "unknown", name: str = "", source: str = "") -> None:
        """Write one unlabeled image uint8 (S, S, 3) (labelled stores refuse it)."""
        if self.labels:
            raise HistopipeError(f"{self.path}: labelled store; use add")
        if image.shape != (self.size, self.size, 3):
            raise HistopipeError(f"{source or self.path}: image {name!r} shape {image.shape} is not ({self.size}, {self.size}, 3)")
        i = self._row(split, tissue, name, source)
        self._arrays["image"][i] = image

    def close(self, attrs: dict[str, Any] | None = None) -> Path:
        """Write the per-patch vectors and attributes and move the store into place."""
        if not self._open:
            return self.path
        root, n = self._root, self.n
        for arr in self._arrays.values():
            arr.resize((n, *arr.shape[1:]))
        rows = max(1, min(n, 65536))
        root.create_array("tissue", data=np.asarray(self._tissue, dtype=np.int16).reshape(n), chunks=(rows,))
        root.create_array("split", data=np.asarray(self._split, dtype=np.uint8).reshape(n), chunks=(rows,))
        for key, values in (("name", self._name), ("source", self._source)):
            arr = root.create_array(key, shape=(n,), dtype=str, chunks=(rows,))
            if n:
                arr[:] = np.asarray(values, dtype=str)
        split = np.asarray(self._split, dtype=np.int64)
        meta = {
            "class_names": list(self.class_names),
            "tissue_names": self.tissue_names,
            "patch_size": self.size,
            "labels": self.labels,
            "n_patches": n,
            "splits": {s: int((split == k).sum()) for k, s in enumerate(SPLITS)},
            "histopipe_version": __version__,
        }
        if self.labels:
            meta["nuclei"] = {s: dict(zip(self.class_names[1:], self._nuclei[k, 1:].tolist(), strict=True))
                              for k, s in enumerate(SPLITS)}
        root.attrs.update({**meta, **(attrs or {})})
        self._open = False
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the temporary store (the target is left as it was)."""
        if self._open:
            self._open = False
            err = exc if exc is not None else HistopipeError(f"{self.path}: store writing aborted")
            # atomic_path removes its temporary output when the exception is thrown into it.
            self._atomic.__exit__(type(err), err, err.__traceback__)


def auto_test_groups(groups: Iterable[str], fraction: float, seed: int, dataset_id: str) -> set[str]:
    """The groups (source images) of one dataset that ``split: auto`` puts in test.

    ``round(fraction * n_groups)`` groups chosen with a generator seeded by ``seed`` and
    the dataset id (so datasets are split independently and reproducibly, whatever the
    reading order); at least one group each side when there are two or more and the
    fraction is strictly between 0 and 1.
    """
    unique = sorted(set(groups))
    n = len(unique)
    k = int(round(fraction * n))
    if n >= 2 and 0 < fraction < 1:
        k = min(max(k, 1), n - 1)
    rng = np.random.default_rng([int(seed), zlib.crc32(dataset_id.encode())])
    return {unique[i] for i in rng.permutation(n)[:k]}


def build_nuclei_store(sources: Sequence[NucleiSource], out: str | Path, settings: NucleiDataSettings) -> Path:
    """Read every dataset of a sheet and write one nuclei store at ``out`` (streamed: one
    sample in memory at a time). All datasets must share one class set."""
    if not sources:
        raise ConfigError("nuclei store: no datasets given")
    names = [class_names(s.format, s.path) for s in sources]
    for s, n in zip(sources[1:], names[1:], strict=True):
        if n != names[0]:
            raise ConfigError(f"{s.path}: dataset {s.dataset_id!r} has classes {n}, unlike {sources[0].dataset_id!r} {names[0]}; "
                              "one store holds one class set")
    summary = {}
    with NucleiStoreWriter(out, settings.patch_size, names[0]) as writer:
        for src in sources:
            test = set()
            if src.split == "auto":
                test = auto_test_groups(sample_groups(src.format, src.path), settings.test_fraction, settings.seed, src.dataset_id)
            counts = dict.fromkeys(SPLITS, 0)
            for sample in read_samples(src.format, src.path):
                if src.tissue:
                    sample.tissue = src.tissue
                split = src.split if src.split != "auto" else ("test" if sample.group in test else "train")
                counts[split] += writer.add(sample, split, src.dataset_id)
            log.info("%s (%s): %d train, %d test patches", src.dataset_id, src.path, counts["train"], counts["test"])
            summary[src.dataset_id] = {"format": src.format, "path": str(src.path), "split": src.split, "patches": counts}
        writer.close({"datasets": summary, "split_seed": settings.seed, "test_fraction": settings.test_fraction})
    return Path(out)


def open_nuclei_store(path: str | Path) -> zarr.Group:
    """Open a nuclei store read-only (HistopipeError naming the path when it is not one)."""
    try:
        root = zarr.open_group(str(path), mode="r")
        if "patch_size" not in root.attrs or "image" not in root:
            raise ValueError("no image array / patch_size attribute")
    except Exception as err:
        raise HistopipeError(f"{path}: not a nuclei store: {err}") from None
    return root


def store_info(path: str | Path) -> dict[str, Any]:
    """Summary of a store: patch size, classes, tissues, patches per split, nuclei per class."""
    root = open_nuclei_store(path)
    a = dict(root.attrs)
    tissue = np.asarray(root["tissue"][:], dtype=np.int64)
    names = a.get("tissue_names", [])
    return {
        "path": str(path),
        "patch_size": a["patch_size"],
        "labels": a.get("labels", True),
        "n_patches": int(a.get("n_patches", len(tissue))),
        "splits": a.get("splits", {}),
        "class_names": a.get("class_names", []),
        "tissue_names": names,
        "tissues": {names[i]: int(c) for i, c in enumerate(np.bincount(tissue, minlength=len(names))) if c},
        "nuclei": a.get("nuclei", {}),
        "datasets": a.get("datasets", {}),
    }


def __getattr__(name: str) -> Any:
    # NucleiDataset needs torch, whose import costs seconds: building a store does not.
    if name == "NucleiDataset":
        from histopipe.nuclei.dataset import NucleiDataset

        return NucleiDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
