"""Typed settings of the config sections ``vae``, ``ldm`` and ``synthesis``.

Keys, defaults and units are documented in ``workflow/schemas/config.schema.yaml``; the
defaults here repeat the schema's (a test checks that they agree) so that code and tests can
build settings without a config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from histopipe.config import section
from histopipe.errors import ConfigError

VARIANTS = ("unconditional", "map", "map_crop_embeddings", "map_crops")
INJECTIONS = ("input", "controlnet", "both")


@dataclass(frozen=True)
class TrainLoopSettings:
    """What the shared training loop needs (optimizer, schedule, checkpoints, logging)."""

    gpus: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    lr_schedule: str = "constant"
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 20000
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 50
    ema_decay: float = 0.0
    checkpoint_every: int = 1000
    checkpoints_keep: int = 2
    sample_every: int = 1000
    log_every: int = 10
    mixed_precision: str = "auto"
    seed: int = 0
    num_workers: int = 4
    augment_flip: bool = True
    eval_every: int = 1000
    eval_samples: int = 64


@dataclass(frozen=True)
class VAESettings(TrainLoopSettings):
    """Config section ``vae``."""

    pretrained: str | None = None
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_attention: bool = True
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    perceptual_encoder: str = "efficientnet_lite0"
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_layers: int = 3
    disc_channels: int = 64
    scale_samples: int = 256
    eval_encoder: str = "efficientnet_lite0"
    memory_mb: float = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        _check_groups("vae", self.block_out_channels, self.norm_num_groups)

    @property
    def uses_disc(self) -> bool:
        return self.disc_weight > 0 and self.disc_start < self.max_steps


@dataclass(frozen=True)
class LDMSettings(TrainLoopSettings):
    """Config section ``ldm``."""

    variant: str = "map_crops"
    models: str | dict = field(default_factory=dict)  # trained pipelines reused by the workflow
    injection: str = "input"
    pretrained_unet: str | None = None
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    first_attention_level: int = 1
    attention_heads: int = 8
    cross_attention_dim: int = 256
    norm_num_groups: int = 32
    map_embed_dim: int = 8
    max_crops: int = 8
    condition_channels: int = 32
    crop_style_dim: int = 16
    crop_style_size: int = 16
    cond_embedding_base_channels: int = 16
    crop_feature_encoder: str = "efficientnet_lite0"
    crop_feature_size: int | None = None
    p_drop_crops: float = 0.1
    p_drop_map: float = 0.05
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    snr_gamma: float = 0.0
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    max_steps: int = 50000
    ema_decay: float = 0.9999
    sample_steps: int = 25
    augment_stain: float = 0.05
    augment_brightness: float = 0.05
    curriculum: tuple[tuple[int, int], ...] = field(default=())
    eval_encoder: str = "efficientnet_lite0"
    memory_mb: float = 1024

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"config.ldm.variant: {self.variant!r} is not one of {VARIANTS}")
        if self.injection not in INJECTIONS:
            raise ConfigError(f"config.ldm.injection: {self.injection!r} is not one of {INJECTIONS}")
        if self.pretrained_unet and self.injection != "controlnet":
            raise ConfigError(
                "config.ldm.injection: a frozen pretrained UNet (ldm.pretrained_unet) cannot read injected "
                f"condition channels; use injection: controlnet (got {self.injection!r})"
            )
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        _check_groups("ldm", self.block_out_channels, self.norm_num_groups)
        stages = []
        for entry in self.curriculum:
            level, until = (entry["level"], entry["until_step"]) if isinstance(entry, dict) else entry
            stages.append((int(level), int(until)))
        if any(b[1] <= a[1] for a, b in zip(stages, stages[1:], strict=False)):
            raise ConfigError("config.ldm.curriculum: until_step must increase from entry to entry")
        object.__setattr__(self, "curriculum", tuple(stages))

    @property
    def uses_map(self) -> bool:
        return self.variant != "unconditional"

    @property
    def uses_crop_canvases(self) -> bool:
        return self.variant == "map_crops"

    @property
    def uses_crop_tokens(self) -> bool:
        return self.variant == "map_crop_embeddings"

    def level_at(self, step: int) -> int:
        """Map level trained on at optimizer step ``step`` (0-based) under the curriculum."""
        for level, until in self.curriculum:
            if step < until:
                return level
        return 0


@dataclass(frozen=True)
class SynthesisSettings:
    """Config section ``synthesis``."""

    gpus: int = 1
    sampler: str = "dpmpp"
    steps: int = 25
    guidance_scale: float = 2.0
    guidance_null: str = "crops"
    batch_size: int = 8
    seed: int = 0
    level: int = 0
    num_per_map: int = 4
    held_out_repeats: int = 1
    limit: int | None = None
    min_crop_side: int = 8
    write_png: bool = True
    flag_encoder: str = "efficientnet_lite0"
    flag_k: int = 1
    flag_quantile: float = 0.95
    flag_normalize: bool = True


def _check_groups(name: str, channels: tuple[int, ...], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(f"config.{name}.block_out_channels: {bad} not multiples of norm_num_groups={groups}")


def vae_settings(cfg: dict) -> VAESettings:
    return section(cfg, "vae", VAESettings)


def ldm_settings(cfg: dict) -> LDMSettings:
    return section(cfg, "ldm", LDMSettings)


def synthesis_settings(cfg: dict) -> SynthesisSettings:
    return section(cfg, "synthesis", SynthesisSettings)
