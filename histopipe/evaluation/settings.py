"""Typed settings of the ``evaluation`` config section (keys, defaults and units live in
``workflow/schemas/config.schema.yaml``; these dataclasses mirror it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from histopipe.config import json_overrides, load_config, section
from histopipe.errors import ConfigError

SEGMENTATION_MODES = ("real", "synthetic", "both")


@dataclass(frozen=True)
class SegmentationSettings:
    """DeepLabv3+ downstream training: budget in optimiser steps of ``batch_size`` patches."""

    encoder: str = "resnet18"
    encoder_weights: str | None = None
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    image_size: int | None = None
    ignore_background: bool = True
    augment: bool = True
    num_workers: int = 2

    def __post_init__(self):
        if self.image_size is not None and self.image_size % 16:
            raise ConfigError(
                f"config.evaluation.segmentation.image_size: {self.image_size} px is not a "
                "multiple of 16 (DeepLabv3+ output stride)"
            )
        if self.batch_size < 2:
            # The ASPP pooling branch has BatchNorm on a 1x1 map: it needs >= 2 samples.
            raise ConfigError("config.evaluation.segmentation.batch_size: must be >= 2")


@dataclass(frozen=True)
class EvaluationSettings:
    encoders: tuple[str, ...] = ("efficientnet_lite0",)
    encoder_weights: dict = field(default_factory=dict)
    device: str = "auto"
    real_split: str = "test"
    max_samples: int | None = 10000
    manifold_samples: int = 5000
    knn_k: int = 5
    knn_independent: bool = True
    seed: int = 0
    batch_size: int = 64
    variants: tuple[str, ...] = ("unconditional", "map", "map_crop_embeddings", "map_crops")
    grid_samples: int = 8
    fidelity_encoder: str = "efficientnet_lite0"
    fidelity_min_side: int = 8
    fidelity_max_pairs: int | None = 300
    fidelity_features: str = "appearance"
    fidelity_stages: int = 3
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)

    def __post_init__(self):
        # Config dicts and lists become the nested dataclass and tuples (the object is frozen).
        if isinstance(self.segmentation, dict):
            object.__setattr__(
                self, "segmentation", section({"s": self.segmentation}, "s", SegmentationSettings)
            )
        object.__setattr__(self, "encoders", tuple(self.encoders))
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.encoders:
            raise ConfigError("config.evaluation.encoders: at least one encoder is needed")

    def with_overrides(self, **changes) -> EvaluationSettings:
        """A copy with the given non-None fields replaced."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_settings(config_path: str | None = None, config_json: str | None = None) -> EvaluationSettings:
    """The ``evaluation`` section of a config file (or the schema defaults), validated."""
    return section(load_config(config_path, json_overrides(config_json)), "evaluation", EvaluationSettings)


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first CUDA GPU when there is one, else the CPU."""
    from histopipe.encoders.registry import resolve_device as resolve

    try:
        return resolve(device)
    except (ConfigError, RuntimeError) as err:
        raise ConfigError(f"config.evaluation.device: {err}") from None
