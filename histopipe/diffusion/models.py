"""Building the VAE, UNet and condition branch from the config, and the denoiser they form.

The condition (``ConditionEncoder``: map embedding, crop canvas, crop style) reaches the
``UNet2DConditionModel`` by ``ldm.injection``:

- ``input``: the encoder's strided convolutions bring it to latent resolution and it is
  concatenated to the noisy latents (the UNet's ``in_channels`` = latent + condition
  channels). Trained jointly from scratch, this follows the map within a few hundred steps.
- ``controlnet``: a diffusers ``ControlNetModel`` branch reads the condition at image
  resolution and adds residuals to the UNet's skip connections. Its zero-initialised outputs
  leave a frozen pretrained UNet (``ldm.pretrained_unet``) untouched at the start, which is
  what it is for; trained jointly with a UNet from scratch it picks up its condition slowly.
- ``both``: input injection and a ControlNet branch.

Every variant uses the same backbone, so the paper's ablations differ only in their
conditioning. Variants without crop tokens feed cross-attention one zero token (to_k/to_v
have no bias, so that is a constant and carries no information).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from histopipe.diffusion.conditioning import ConditionEncoder, CropSlots, CropTokenEncoder
from histopipe.diffusion.settings import LDMSettings, VAESettings
from histopipe.errors import HistopipeError, WeightsError


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Image px per latent px."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_vae(s: VAESettings, image_size: int) -> AutoencoderKL:
    n = len(s.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=s.block_out_channels,
        layers_per_block=s.layers_per_block,
        latent_channels=s.latent_channels,
        norm_num_groups=s.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=s.mid_attention,
    )


def _model_folder(path: str | Path, subfolder: str) -> Path:
    """``path`` itself, or ``path/subfolder`` when ``path`` is a whole pipeline folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    raise WeightsError(f"{path}: no diffusers model here (expected config.json in it or in {subfolder}/)")


def load_vae(path: str | Path) -> AutoencoderKL:
    folder = _model_folder(path, "vae")
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except Exception as err:
        raise WeightsError(f"{folder}: cannot load an AutoencoderKL ({type(err).__name__}: {err})") from None
    return vae


def load_unet(path: str | Path) -> UNet2DConditionModel:
    folder = _model_folder(path, "unet")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder)
    except Exception as err:
        raise WeightsError(f"{folder}: cannot load a UNet2DConditionModel ({type(err).__name__}: {err})") from None
    if unet.config.addition_embed_type is not None:
        raise WeightsError(f"{folder}: UNets with added conditions ({unet.config.addition_embed_type}, e.g. SDXL) are not supported")
    return unet


def build_unet(s: LDMSettings, latent_channels: int, latent_size: int, condition_channels: int = 0) -> UNet2DConditionModel:
    """A UNet over latents (plus ``condition_channels`` injected input channels)."""
    n = len(s.block_out_channels)
    attn = [i >= s.first_attention_level for i in range(n)]
    if n > 1 and not any(attn):
        raise HistopipeError(f"config.ldm.first_attention_level={s.first_attention_level} leaves no attention level of {n}")
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels + condition_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=s.block_out_channels,
        layers_per_block=s.layers_per_block,
        cross_attention_dim=s.cross_attention_dim,
        # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads.
        attention_head_dim=s.attention_heads,
        norm_num_groups=s.norm_num_groups,
    )


def cond_embedding_channels(base: int, scale_factor: int) -> tuple[int, ...]:
    """Channels of the ControlNet condition embedding: log2(scale_factor) stride-2 stages."""
    stages = int(round(math.log2(scale_factor)))
    if 2**stages != scale_factor:
        raise HistopipeError(f"VAE scale factor {scale_factor} is not a power of 2")
    return tuple(min(base * 2**i, 256) for i in range(stages + 1))


def build_controlnet(unet: UNet2DConditionModel, s: LDMSettings, scale_factor: int, condition_channels: int) -> ControlNetModel:
    return ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=cond_embedding_channels(s.cond_embedding_base_channels, scale_factor),
        conditioning_channels=condition_channels,
    )


class Denoiser(nn.Module):
    """UNet + condition encoder (+ ControlNet branch, crop tokens): one module to train,
    checkpoint and EMA. The variant follows from the parts present (``variant_of``)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        condition_encoder: ConditionEncoder | None = None,
        controlnet: ControlNetModel | None = None,
        crop_encoder: CropTokenEncoder | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder
        self.controlnet = controlnet
        self.crop_encoder = crop_encoder
        if condition_encoder is None and (controlnet is not None or crop_encoder is not None):
            raise HistopipeError("a ControlNet branch or crop tokens need a condition encoder (the map)")
        injected = 0 if condition_encoder is None or condition_encoder.to_latent is None else condition_encoder.config.out_channels
        if condition_encoder is not None and not injected and controlnet is None:
            raise HistopipeError("the condition reaches the UNet neither by input injection nor by a ControlNet branch")
        if unet.config.in_channels != unet.config.out_channels + injected:
            raise HistopipeError(
                f"the UNet reads {unet.config.in_channels} channels but gets {unet.config.out_channels} latent + {injected} condition channels"
            )

    @property
    def variant(self) -> str:
        return variant_of(self.condition_encoder, self.crop_encoder)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        maps: torch.Tensor | None = None,
        slots: CropSlots | None = None,
        crop_features: torch.Tensor | None = None,
        level: int = 0,
        drop_map: torch.Tensor | None = None,
        drop_crops: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise (or v) for latents (B, C, h, w) at timesteps (B,).

        maps (B, H, W) int at image resolution; slots the crops; crop_features (B, K, F) for the
        crop-token variant; drop_* (B,) bool mark samples trained/sampled without that condition.
        """
        b = latents.shape[0]
        if self.crop_encoder is not None:
            if slots is None or crop_features is None:
                raise HistopipeError("the map + crop-embedding model needs crops and their features")
            valid = slots.dropped(drop_crops).valid
            context = self.crop_encoder(crop_features, slots.labels, valid, level)
        else:
            context = latents.new_zeros(b, 1, self.unet.config.cross_attention_dim)
        context = context.to(latents.dtype)
        enc = self.condition_encoder
        if enc is None:
            return self.unet(latents, timesteps, encoder_hidden_states=context).sample
        if maps is None:
            raise HistopipeError("this model is conditioned on a semantic map: give maps")
        cond = enc.image_condition(maps, slots, level, drop_map, drop_crops).to(latents.dtype)
        x = latents if enc.to_latent is None else torch.cat([latents, enc(cond)], dim=1)
        residuals = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(x, timesteps, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x, timesteps, encoder_hidden_states=context, **residuals).sample


def variant_of(condition_encoder: ConditionEncoder | None, crop_encoder: CropTokenEncoder | None) -> str:
    if condition_encoder is None:
        return "unconditional"
    if crop_encoder is not None:
        return "map_crop_embeddings"
    return "map_crops" if condition_encoder.config.with_crops else "map"


def build_denoiser(
    s: LDMSettings,
    vae: AutoencoderKL,
    image_size: int,
    level_num_labels: list[int],
    crop_feature_dim: int | None = None,
) -> Denoiser:
    """A fresh denoiser for ``s.variant`` (over a frozen pretrained UNet when configured)."""
    factor = vae_scale_factor(vae)
    if image_size % factor:
        raise HistopipeError(f"patch size {image_size} px is not a multiple of the VAE's scale factor {factor}")
    latent_size = image_size // factor
    latent_channels = vae.config.latent_channels
    encoder = None
    injected = 0
    if s.uses_map:
        injected = s.condition_channels if s.injection in ("input", "both") else 0
        encoder = ConditionEncoder(
            level_num_labels=tuple(level_num_labels),
            embed_dim=s.map_embed_dim,
            with_crops=s.uses_crop_canvases,
            style_dim=s.crop_style_dim,
            crop_size=s.crop_style_size,
            out_channels=injected,
            scale_factor=factor,
            base_channels=s.cond_embedding_base_channels,
        )
    if s.pretrained_unet:
        unet = load_unet(s.pretrained_unet)
        if unet.config.in_channels != latent_channels:
            raise WeightsError(f"{s.pretrained_unet}: UNet takes {unet.config.in_channels} latent channels, the VAE gives {latent_channels}")
        unet.requires_grad_(False)
        # The UNet is convolutional: it runs at our latent size, which the pipeline then reports.
        unet.register_to_config(sample_size=latent_size)
    else:
        unet = build_unet(s, latent_channels, latent_size, injected)
    controlnet = crop_encoder = None
    if s.uses_map and s.injection in ("controlnet", "both"):
        controlnet = build_controlnet(unet, s, factor, encoder.image_channels)
    if s.uses_crop_tokens:
        if crop_feature_dim is None:
            raise HistopipeError("map_crop_embeddings needs the crop feature width")
        crop_encoder = CropTokenEncoder(
            feature_dim=crop_feature_dim,
            cross_attention_dim=unet.config.cross_attention_dim,
            level_num_labels=tuple(level_num_labels),
            feature_encoder=s.crop_feature_encoder,
            feature_size=s.crop_feature_size,
        )
    return Denoiser(unet, encoder, controlnet, crop_encoder)
