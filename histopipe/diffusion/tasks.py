"""What the shared loop trains: the VAE (reconstruction + KL) and the LDM (denoising).

Each task owns its model, its loss on one micro-batch of contract-#4 dicts, the sample grid
logged during training and the ``save_pretrained`` export.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from histopipe.diffusion.augment import augment_batch, flip_rotate
from histopipe.diffusion.conditioning import slots_from_image
from histopipe.diffusion.crop_features import CropFeaturizer
from histopipe.diffusion.models import Denoiser, build_denoiser, build_vae
from histopipe.diffusion.pipeline import HistoSynthesisPipeline, images_to_latents, to_uint8
from histopipe.diffusion.settings import LDMSettings, VAESettings
from histopipe.errors import HistopipeError


def label_colors(n: int) -> np.ndarray:
    """A fixed colour per label (uint8 (n, 3)); background 0 is white."""
    colors = np.random.default_rng(20240601).integers(30, 230, size=(max(n, 1), 3)).astype(np.uint8)
    colors[0] = 255
    return colors


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 (B, H, W, 3) images → one uint8 (H', W', 3) image with white gutters."""
    b, h, w, _ = rows[0].shape
    out = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(b):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y : y + h, x : x + w] = row[c]
    return out


def reference_batch(dataset, n: int = 4) -> dict[str, torch.Tensor]:
    """The first ``n`` items of a dataset, collated (fixed patches for sample grids)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}


class _VAEWithLoss(nn.Module):
    """The VAE behind one forward (so DDP sees one call): returns (reconstruction, KL sum)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        rec = self.vae.decode(posterior.sample(gen)).sample
        return rec, posterior.kl()


class VAETask:
    """Train an AutoencoderKL: L1 reconstruction + kl_weight · KL (both per image element)."""

    name = "vae"

    def __init__(self, s: VAESettings, image_size: int, reference: dict[str, torch.Tensor], scale_images: torch.Tensor | None = None):
        """``reference``: a few patches for the reconstruction grid; ``scale_images`` (N, 3, S, S)
        the patches whose latent spread sets the exported ``scaling_factor`` (default: reference)."""
        torch.manual_seed(s.seed)
        self.s = s
        self.model = _VAEWithLoss(build_vae(s, image_size))
        self.reference = reference
        self.scale_images = reference["image"] if scale_images is None else scale_images

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.reference = {k: v.to(device) for k, v in self.reference.items()}

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        images = batch["image"]
        if self.s.augment_flip:
            images, _, _ = flip_rotate(images, batch["map"], batch["crop_boxes"], gen)
        rec, kl = model(images, gen)
        return F.l1_loss(rec.float(), images.float()) + self.s.kl_weight * kl.float().mean() / images[0].numel()

    def sample_grid(self, model: nn.Module, step: int = 0) -> np.ndarray:
        images = self.reference["image"]
        rec = model.vae.decode(model.vae.encode(images).latent_dist.mode()).sample
        return grid([to_uint8(images), to_uint8(rec)])

    def export(self, model: nn.Module, folder: Path) -> None:
        vae = copy.deepcopy(model.vae).float()
        device = next(vae.parameters()).device
        with torch.no_grad():
            z = torch.cat([vae.encode(x.to(device).float()).latent_dist.mode() for x in self.scale_images.split(8)])
        # Scale latents to unit variance, as the diffusion model's noise schedule assumes.
        std = float(z.std())
        vae.register_to_config(scaling_factor=1.0 / std if std > 0 and math.isfinite(std) else 1.0)
        vae.save_pretrained(folder)


class LDMTask:
    """Train the denoiser (UNet + ControlNet branch + condition encoders) on frozen VAE latents."""

    name = "pipeline"

    def __init__(
        self,
        s: LDMSettings,
        vae: AutoencoderKL,
        image_size: int,
        level_luts: np.ndarray,
        reference: dict[str, torch.Tensor],
        label_names: list[str] | None = None,
        mpp: float | None = None,
        featurizer: CropFeaturizer | None = None,
    ):
        self.s = s
        self.level_luts = torch.as_tensor(np.asarray(level_luts), dtype=torch.long)
        level_num_labels = [int(row.max()) + 1 for row in self.level_luts]
        for level, _ in s.curriculum:
            if level >= len(level_num_labels):
                raise HistopipeError(f"config.ldm.curriculum: level {level} but the dataset has {len(level_num_labels)} map levels")
        if s.uses_crop_tokens and featurizer is None:
            featurizer = CropFeaturizer(s.crop_feature_encoder)
        self.featurizer = featurizer if s.uses_crop_tokens else None
        torch.manual_seed(s.seed)
        self.model: Denoiser = build_denoiser(
            s, vae, image_size, level_num_labels, crop_feature_dim=None if self.featurizer is None else self.featurizer.dim
        )
        self.vae = vae.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler(s)
        self.reference = reference
        self.label_names = list(label_names or [])
        self.mpp = mpp

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.vae.to(device)
        if dtype != self.vae.dtype:
            self.vae.to(dtype=dtype)
        self.level_luts = self.level_luts.to(device)
        self.reference = {k: v.to(device) for k, v in self.reference.items()}
        if self.featurizer is not None and self.featurizer.device != device:
            self.featurizer = CropFeaturizer(self.featurizer.name, device)

    def _condition_inputs(self, images, maps, boxes, labels, valid, level, gen):
        if level:
            maps, labels = self.level_luts[level][maps], self.level_luts[level][labels]
        slots = feats = None
        if self.s.uses_crop_canvases or self.s.uses_crop_tokens:
            slots = slots_from_image(images, boxes, labels, valid, self.s.max_crops, gen)
            if self.featurizer is not None:
                feats = self.featurizer(slots)
        return maps, slots, feats

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        s = self.s
        level = s.level_at(step)
        images, maps, boxes = augment_batch(
            batch["image"], batch["map"], batch["crop_boxes"], gen,
            flip=s.augment_flip, stain=s.augment_stain, brightness=s.augment_brightness,
        )
        maps, slots, feats = self._condition_inputs(images, maps, boxes, batch["crop_labels"], batch["crop_valid"], level, gen)
        with torch.no_grad():
            latents = images_to_latents(self.vae, images, gen).float()
        b, dev = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(dev)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=gen, device=gen.device).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        drop_map = (torch.rand(b, generator=gen, device=gen.device) < s.p_drop_map).to(dev)
        drop_crops = (torch.rand(b, generator=gen, device=gen.device) < s.p_drop_crops).to(dev)
        pred = model(noisy, t, maps, slots, feats, level, drop_map, drop_crops)
        if s.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    def pipeline(self, model: Denoiser, vae: AutoencoderKL | None = None) -> HistoSynthesisPipeline:
        pipe = HistoSynthesisPipeline(
            vae=vae or self.vae,
            unet=model.unet,
            scheduler=copy.deepcopy(self.noise_scheduler),
            controlnet=model.controlnet,
            map_encoder=model.map_encoder,
            crop_encoder=model.crop_encoder,
            max_crops=self.s.max_crops if self.s.variant in ("map_crops", "map_crop_embeddings") else 0,
            label_names=self.label_names,
            mpp=self.mpp,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_grid(self, model: Denoiser, step: int = 0) -> np.ndarray:
        ref = self.reference
        level = self.s.level_at(step)
        maps, slots, feats = self._condition_inputs(ref["image"], ref["map"], ref["crop_boxes"], ref["crop_labels"], ref["crop_valid"], level, None)
        pipe = self.pipeline(model)
        pipe.use_sampler("ddim")
        gens = [torch.Generator(device=ref["image"].device).manual_seed(i) for i in range(len(maps))]
        out = pipe(maps, slots, feats, num_images=len(maps), level=level, num_inference_steps=self.s.sample_steps, generator=gens)
        colors = label_colors(int(self.level_luts[level].max()) + 1)
        return grid([to_uint8(ref["image"]), colors[maps.cpu().numpy()], out.images])

    def export(self, model: Denoiser, folder: Path) -> None:
        vae = self.vae if self.vae.dtype == torch.float32 else copy.deepcopy(self.vae).float()
        self.pipeline(model, vae).save_pretrained(folder)


def noise_scheduler(s: LDMSettings) -> DDPMScheduler:
    """The DDPM training schedule (Stable Diffusion's settings for latent diffusion)."""
    return DDPMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=s.beta_schedule,
        prediction_type=s.prediction_type,
        clip_sample=False,
        # "trailing" spacing starts sampling at the last training step (t = T-1) for any step
        # count, including all T steps of ancestral DDPM sampling.
        timestep_spacing="trailing",
    )
