"""What a map's label values mean, recorded from the maps to the trained models, and the
check that lets trained generative models be reused on a new cohort.

A label value of a k-means map is a tissue type of one cluster model; of an annotation map,
one annotation class. Tissue maps, patch datasets and trained pipelines carry that space
(source, number of labels, label names and, for k-means maps, the cluster model's id: a
hash of its centroids and level LUTs, the same for a copied or moved model folder), so that
a pipeline is only applied to maps in the space it was trained on.

Reading a pipeline's record needs no torch: it is the JSON ``save_pretrained`` writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histopipe.errors import ConfigError, HistopipeError

PIPELINE_INDEX = "model_index.json"


def cluster_model_id(centroids: np.ndarray, level_luts: np.ndarray) -> str:
    """A short, stable id of a fitted cluster model (its centroids and level LUTs)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(centroids, np.float32), np.ascontiguousarray(level_luts, np.int32)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LabelSpace:
    """The meaning of label values: ``source`` kmeans or annotation, ``num_labels`` (with
    background 0), ``label_names`` and the cluster model's id and path (k-means maps; the
    path is where it was, for messages only)."""

    source: str | None
    num_labels: int
    label_names: tuple[str, ...] = ()
    cluster_model_id: str | None = None
    cluster_model: str | None = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> LabelSpace:
        """From the attributes of a tissue map or patch dataset, or a pipeline's record."""
        return cls(
            source=attrs.get("source"),
            num_labels=int(attrs.get("num_labels", 0)),
            label_names=tuple(attrs.get("label_names") or ()),
            cluster_model_id=attrs.get("cluster_model_id"),
            cluster_model=attrs.get("cluster_model"),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        return d

    def differences(self, other: LabelSpace) -> list[str]:
        """What differs from ``other`` ("name: mine vs other"), for what both record."""
        out = []
        if self.source and other.source and self.source != other.source:
            out.append(f"label source {self.source} vs {other.source}")
        if self.num_labels and other.num_labels and self.num_labels != other.num_labels:
            out.append(f"{self.num_labels} vs {other.num_labels} labels (background included)")
        elif self.label_names and other.label_names and self.label_names != other.label_names:
            out.append(f"label names {list(self.label_names)} vs {list(other.label_names)}")
        if self.cluster_model_id and other.cluster_model_id and self.cluster_model_id != other.cluster_model_id:
            out.append(f"tissue types of cluster model {self.cluster_model_id} ({self.cluster_model}) vs "
                       f"{other.cluster_model_id} ({other.cluster_model})")
        return out


def pipeline_record(folder: str | Path) -> dict[str, Any]:
    """The configuration a trained pipeline folder records (its ``model_index.json``)."""
    index = Path(folder) / PIPELINE_INDEX
    if not index.is_file():
        raise ConfigError(f"{folder}: not a trained pipeline folder (no {PIPELINE_INDEX}); give the model/ folder train-ldm writes")
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{index}: unreadable ({err})") from None


def pipeline_variant(record: dict[str, Any]) -> str:
    """The ablation variant of a pipeline, from the components it has."""
    def has(name: str) -> bool:
        value = record.get(name)
        return isinstance(value, list) and len(value) == 2 and value[0] is not None

    if not has("condition_encoder"):
        return "unconditional"
    if has("crop_encoder"):
        return "map_crop_embeddings"
    return "map_crops" if int(record.get("max_crops", 0)) > 0 else "map"


def pipeline_label_space(record: dict[str, Any]) -> LabelSpace:
    """The label space a pipeline was trained in (pipelines saved before it was recorded give
    only their label names)."""
    recorded = record.get("label_space")
    if recorded:
        return LabelSpace.from_attrs(recorded)
    names = tuple(record.get("label_names") or ())
    return LabelSpace(source=None, num_labels=len(names), label_names=names)


def pipeline_image_size(folder: str | Path) -> int | None:
    """Side (px) of the images a pipeline makes: UNet sample size × VAE downsampling."""
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def check_pipeline(folder: str | Path, variant: str, expected: LabelSpace, mpp: float, size: int) -> list[str]:
    """Problems of reusing the pipeline ``folder`` as ``variant`` on maps in ``expected``
    space, made at ``mpp`` µm/px and ``size`` px (empty: it fits)."""
    record = pipeline_record(folder)
    problems = []
    found = pipeline_variant(record)
    if found != variant:
        problems.append(f"it is a {found} model, not {variant}")
    problems += pipeline_label_space(record).differences(expected)
    trained_mpp = record.get("mpp")
    if trained_mpp and abs(float(trained_mpp) - mpp) > 1e-3 * mpp:
        problems.append(f"trained at {float(trained_mpp):g} µm/px, the patches are {mpp:g} µm/px")
    trained_size = pipeline_image_size(folder)
    if trained_size and trained_size != size:
        problems.append(f"makes {trained_size} px images, the patches are {size} px")
    return problems


def check_dataset(pipeline: LabelSpace, dataset: dict[str, Any], model: str | Path, store: str | Path) -> None:
    """Refuse to synthesise from a dataset's maps in another label space than the pipeline's."""
    problems = pipeline.differences(LabelSpace.from_attrs(dataset))
    if problems:
        raise HistopipeError(f"{model}: trained on other labels than the maps of {store}: " + "; ".join(problems)
                             + " (model vs maps)")
