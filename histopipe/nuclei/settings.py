"""Typed settings of the config subsections ``nuclei.model``, ``nuclei.train``,
``nuclei.synthesis`` and ``nuclei.layout``.

Keys, defaults and units are documented in ``workflow/schemas/config.schema.yaml``; the
defaults here repeat the schema's (a test checks that they agree) so that code and tests can
build settings without a config file.
"""

from __future__ import annotations

from dataclasses import dataclass

from histopipe.config import section
from histopipe.diffusion.settings import TrainLoopSettings
from histopipe.errors import ConfigError

MODES = ("joint", "nudiff")
SPACES = ("pixel", "latent")
TISSUE_CONDITIONS = ("none", "embedding", "text")
SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("v_prediction", "epsilon")
SAMPLERS = ("ddim", "ddpm")
INSTANCE_METHODS = ("marker", "watershed", "connectivity")
DEFAULT_PROMPT = "high-quality histopathology {tissue} tissue image including nuclei types of {types}"


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config.nuclei.{key}: {value!r} is not one of {allowed}")


@dataclass(frozen=True)
class NucleiModelSettings:
    """Config subsection ``nuclei.model``."""

    mode: str = "joint"
    space: str = "pixel"
    vae_pretrained: str | None = None
    image_size: int = 256
    num_classes: int | None = None
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    first_attention_level: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 256
    point_channels: int = 32
    point_spread: float = 3.0
    timesteps: int = 1000
    schedule: str = "cosine"
    prediction: str = "v_prediction"
    loss_weights: tuple[float, float, float] = (9.0, 1.0, 3.0)
    label_ce_weight: float = 1.0
    tissue_condition: str = "embedding"
    text_encoder: str | None = None
    prompt_template: str = DEFAULT_PROMPT
    p_drop_tissue: float = 0.1
    nudiff_structure_condition: str = "none"

    def __post_init__(self) -> None:
        _choice("model.mode", self.mode, MODES)
        _choice("model.space", self.space, SPACES)
        _choice("model.schedule", self.schedule, SCHEDULES)
        _choice("model.prediction", self.prediction, PREDICTIONS)
        _choice("model.tissue_condition", self.tissue_condition, TISSUE_CONDITIONS)
        _choice("model.nudiff_structure_condition", self.nudiff_structure_condition, ("none", "points"))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if len(self.loss_weights) != 3:
            raise ConfigError("config.nuclei.model.loss_weights: give three weights (image, distance, labels)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"config.nuclei.model.block_out_channels: {bad} not multiples of norm_num_groups={self.norm_num_groups}")
        if self.tissue_condition == "text" and not self.text_encoder:
            raise ConfigError("config.nuclei.model.text_encoder: tissue_condition 'text' needs a local CLIP text encoder folder")


@dataclass(frozen=True)
class NucleiTrainSettings(TrainLoopSettings):
    """Config subsection ``nuclei.train`` (the shared loop's keys + the sample grid's steps)."""

    lr: float = 1e-4
    max_steps: int = 50000
    ema_decay: float = 0.9999
    lr_schedule: str = "cosine"
    sample_steps: int = 25
    eval_samples: int = 16


@dataclass(frozen=True)
class NucleiSynthesisSettings:
    """Config subsection ``nuclei.synthesis``."""

    source: str = "test"
    counts: str | None = None
    tissue: str | None = None
    num_images: int = 16
    num_per_layout: int = 1
    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 2.0
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None
    instance_method: str = "marker"
    write_png: bool = True

    def __post_init__(self) -> None:
        _choice("synthesis.source", self.source, ("test", "counts"))
        _choice("synthesis.sampler", self.sampler, SAMPLERS)
        _choice("synthesis.instance_method", self.instance_method, INSTANCE_METHODS)


@dataclass(frozen=True)
class NucleiLayoutSettings:
    """Config subsection ``nuclei.layout``."""

    spacing_quantile: float = 0.02
    default_spacing: float = 4.0
    border: int = 2
    density_grid: int = 8
    max_tries: int = 2000
    seed: int = 0


def nuclei_section(cfg: dict, name: str, cls: type):
    """Settings of ``cfg["nuclei"][name]`` (cfg from ``load_config``) as dataclass ``cls``."""
    return section(cfg.get("nuclei", {}), name, cls)


def model_settings(cfg: dict) -> NucleiModelSettings:
    return nuclei_section(cfg, "model", NucleiModelSettings)


def train_settings(cfg: dict) -> NucleiTrainSettings:
    return nuclei_section(cfg, "train", NucleiTrainSettings)


def synthesis_settings(cfg: dict) -> NucleiSynthesisSettings:
    return nuclei_section(cfg, "synthesis", NucleiSynthesisSettings)


def layout_settings(cfg: dict) -> NucleiLayoutSettings:
    return nuclei_section(cfg, "layout", NucleiLayoutSettings)
