"""Inference: ``HistoSynthesisPipeline`` turns maps (+ crops) into image–label pairs.

A diffusers ``DiffusionPipeline``: ``save_pretrained`` writes one folder per component plus
``model_index.json``; ``from_pretrained`` rebuilds it with no histopipe-specific loading code.
The label of every synthetic image is the map it was conditioned on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histopipe.diffusion.conditioning import ConditionEncoder, CropSlots, CropTokenEncoder
from histopipe.diffusion.crop_features import CropFeaturizer
from histopipe.diffusion.models import Denoiser, vae_scale_factor, variant_of
from histopipe.errors import HistopipeError

SAMPLERS = ("ddim", "dpmpp", "dpmpp_sde", "ddpm")


@dataclass
class HistoSynthesisOutput(BaseOutput):
    """images uint8 (B, H, W, 3) (or float (B, 3, H, W) in [-1, 1] for output_type="pt");
    labels uint16 (B, H, W): the tissue-type map of each image (None when unconditional)."""

    images: np.ndarray | torch.Tensor
    labels: np.ndarray | None


def latents_to_images(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents to images (B, 3, H, W) in [-1, 1]."""
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.clamp(-1, 1)


def images_to_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode images (B, 3, H, W) in [-1, 1] to scaled latents (a sample of the posterior)."""
    latents = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class HistoSynthesisPipeline(DiffusionPipeline):
    """Latent diffusion conditioned on a semantic map and raw crops (paper 004).

    Components: ``vae`` (AutoencoderKL), ``unet`` (UNet2DConditionModel), ``scheduler``;
    optional ``condition_encoder`` (ConditionEncoder: map and raw crops), ``controlnet``
    (ControlNetModel over the condition tensor) and ``crop_encoder`` (CropTokenEncoder,
    crop-embedding variant).
    Config: ``max_crops`` (crop slots per image), ``label_names`` (index = map value),
    ``mpp`` (µm/px of the training patches) and ``label_space`` (what the map values mean,
    ``histopipe.label_space``), recorded for synthesis and for reusing the model.
    """

    model_cpu_offload_seq = "crop_encoder->condition_encoder->controlnet->unet->vae"
    _optional_components = ["condition_encoder", "controlnet", "crop_encoder"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        condition_encoder: ConditionEncoder | None = None,
        controlnet: ControlNetModel | None = None,
        crop_encoder: CropTokenEncoder | None = None,
        max_crops: int = 0,
        label_names: list[str] | None = None,
        mpp: float | None = None,
        label_space: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, unet=unet, scheduler=scheduler, condition_encoder=condition_encoder, controlnet=controlnet,
            crop_encoder=crop_encoder,
        )
        self.register_to_config(max_crops=int(max_crops), label_names=list(label_names or []), mpp=mpp,
                                label_space=label_space)
        self._featurizer: CropFeaturizer | None = None

    @property
    def variant(self) -> str:
        return variant_of(self.condition_encoder, self.crop_encoder)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * vae_scale_factor(self.vae)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.condition_encoder, self.controlnet, self.crop_encoder)

    def use_sampler(self, name: str) -> None:
        """Swap the scheduler for sampling: ``ddim``, ``dpmpp`` (DPM-Solver++ 2M), ``dpmpp_sde``
        (its stochastic form, SDE-DPM-Solver++ 2M: fresh noise each step) or ``ddpm``."""
        config = self.scheduler.config
        if name == "ddim":
            self.scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False)
        elif name == "dpmpp":
            self.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        elif name == "dpmpp_sde":
            self.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)
        elif name == "ddpm":
            self.scheduler = DDPMScheduler.from_config(config)
        else:
            raise HistopipeError(f"unknown sampler {name!r} (choose one of {SAMPLERS})")

    def crop_features(self, slots: CropSlots) -> torch.Tensor:
        """Features of the crops with the frozen encoder the crop-token encoder was trained on."""
        if self._featurizer is None:
            config = self.crop_encoder.config
            self._featurizer = CropFeaturizer(config.feature_encoder, device=self.device, size=config.get("feature_size"))
        return self._featurizer(slots)

    def noise_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        maps: torch.Tensor | None,
        slots: CropSlots | None,
        crop_features: torch.Tensor | None,
        level: int = 0,
        guidance_scale: float = 1.0,
        guidance_null: str = "crops",
        with_uncond: bool | None = None,
    ) -> torch.Tensor:
        """Classifier-free guided prediction: uncond + scale · (cond − uncond).

        The unconditional branch drops the crops (``guidance_null="crops"``) or the map and
        the crops (``"map_and_crops"``). ``with_uncond=None`` runs it only when the scale is not
        1 and the model is conditional.
        """
        b = latents.shape[0]
        denoiser = self.denoiser
        if with_uncond is None:
            with_uncond = guidance_scale != 1.0 and self.variant != "unconditional"
        ts = t.expand(b) if t.ndim else t.repeat(b)
        if not with_uncond:
            return denoiser(latents, ts, maps, slots, crop_features, level)
        if guidance_null not in ("crops", "map_and_crops"):
            raise HistopipeError(f"guidance_null must be 'crops' or 'map_and_crops', not {guidance_null!r}")
        two = torch.arange(b, device=latents.device).repeat(2)
        uncond = torch.arange(2 * b, device=latents.device) >= b
        pred = denoiser(
            latents[two],
            ts[two],
            None if maps is None else maps[two],
            None if slots is None else slots.select(two),
            None if crop_features is None else crop_features[two],
            level,
            drop_map=uncond if guidance_null == "map_and_crops" else torch.zeros_like(uncond),
            drop_crops=uncond,
        )
        cond, unc = pred[:b], pred[b:]
        return unc + guidance_scale * (cond - unc)

    @torch.no_grad()
    def __call__(
        self,
        maps: np.ndarray | torch.Tensor | None = None,
        crops: CropSlots | None = None,
        crop_features: torch.Tensor | None = None,
        num_images: int | None = None,
        level: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        guidance_null: str = "crops",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> HistoSynthesisOutput | tuple:
        """Synthesize images for ``maps`` (B, H, W) tissue-type ids and their ``crops``.

        H and W are the model's image size. ``generator`` may be a list (one per image) so
        that each image depends only on its own seed. ``num_images`` is needed only by the
        unconditional variant. Returns images uint8 (B, H, W, 3) and labels = the maps.
        """
        device, dtype = self._execution_device, self.unet.dtype
        variant = self.variant
        if variant == "unconditional":
            b = num_images if maps is None else len(maps)
            if b is None:
                raise HistopipeError("give num_images (or maps) to the unconditional model")
            maps_t = None
        else:
            if maps is None:
                raise HistopipeError("this model is conditioned on a semantic map: give maps")
            maps_t = torch.as_tensor(np.asarray(maps) if not torch.is_tensor(maps) else maps).long().to(device)
            b = maps_t.shape[0]
            if tuple(maps_t.shape[1:]) != (self.image_size, self.image_size):
                raise HistopipeError(f"maps are {tuple(maps_t.shape[1:])} px; the model makes {self.image_size}×{self.image_size} px images")
        if variant in ("map_crops", "map_crop_embeddings"):
            if crops is None:
                raise HistopipeError(f"the {variant} model needs crops (CropSlots)")
            crops = crops.to(device, dtype)
            if variant == "map_crop_embeddings" and crop_features is None:
                crop_features = self.crop_features(crops)
        else:
            crops = None
        if crop_features is not None:
            crop_features = crop_features.to(device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        h = self.unet.config.sample_size
        shape = (b, self.unet.config.out_channels, h, h)
        # The sampler's arithmetic stays in float32 even when the networks run in bf16/fp16.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = self.scheduler.scale_model_input(latents, t).to(dtype)
            pred = self.noise_prediction(inp, t, maps_t, crops, crop_features, level, guidance_scale, guidance_null)
            latents = self.scheduler.step(pred.float(), t, latents, generator=generator).prev_sample
        images = latents_to_images(self.vae, latents)
        labels = None if maps_t is None else maps_t.cpu().numpy().astype(np.uint16)
        images = images.float() if output_type == "pt" else to_uint8(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, labels
        return HistoSynthesisOutput(images=images, labels=labels)
