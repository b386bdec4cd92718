"""What the shared loop trains: the VAE (reconstruction, perceptual, KL, adversarial) and the
LDM (denoising).

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
from histopipe.diffusion.autoencoder import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
)
from histopipe.diffusion.conditioning import slots_from_image
from histopipe.diffusion.crop_features import CropFeaturizer
from histopipe.diffusion.models import Denoiser, build_denoiser, build_vae
from histopipe.diffusion.monitor import SampleMonitor
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


def reference_batch(dataset, n: int = 4, spread: bool = False) -> dict[str, torch.Tensor]:
    """``n`` items of a dataset, collated: fixed patches for sample grids and evaluations.

    The first ``n``, or with ``spread`` ``n`` evenly spaced over the dataset (neighbouring
    patches of one slide overlap; spaced ones show more of the data)."""
    return _collate(dataset, _reference_index(len(dataset), n, spread))


def other_batch(dataset, n: int, reference_n: int) -> dict[str, torch.Tensor] | None:
    """Up to ``n`` items that ``reference_batch(dataset, reference_n, spread=True)`` (``reference_n``
    items: its ``n`` or the whole dataset) left out,
    evenly spaced over the rest: other real patches to compare the reference with. None when
    fewer than two are left."""
    rest = np.setdiff1d(np.arange(len(dataset)), _reference_index(len(dataset), reference_n, True))
    if len(rest) < 2:
        return None
    return _collate(dataset, rest[_reference_index(len(rest), n, True)])


def _reference_index(length: int, n: int, spread: bool) -> np.ndarray:
    m = min(n, length)
    return np.linspace(0, length - 1, m).round().astype(int) if spread and m > 1 else np.arange(m)


def _collate(dataset, index: np.ndarray) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in index]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}


class _VAEWithLoss(nn.Module):
    """The VAE (+ discriminator) behind one forward, so DDP sees one call: returns the losses.

    Generator terms: L1 + perceptual_weight · perceptual + kl_weight · KL (per image element),
    and after ``disc_start`` steps the adaptive adversarial term. The discriminator's hinge
    loss on detached reconstructions is added to the same total; its parameters are frozen
    while the generator term is computed, so each part only trains its own network.
    """

    def __init__(self, vae: AutoencoderKL, s: VAESettings):
        super().__init__()
        self.s = s
        self.vae = vae
        self.perceptual = None  # built on the training device by VAETask.to
        self.disc = PatchDiscriminator(s.disc_layers, s.disc_channels) if s.uses_disc else None

    def forward(self, images: torch.Tensor, gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        s = self.s
        posterior = self.vae.encode(images).latent_dist
        rec = self.vae.decode(posterior.sample(gen)).sample
        l1 = F.l1_loss(rec.float(), images.float())
        losses = {"l1": l1, "kl": posterior.kl().float().mean() / images[0].numel()}
        rec_loss = l1
        if self.perceptual is not None and s.perceptual_weight > 0:
            losses["perceptual"] = self.perceptual(rec.float(), images.float())
            rec_loss = rec_loss + s.perceptual_weight * losses["perceptual"]
        total = rec_loss + s.kl_weight * losses["kl"]
        if self.disc is not None and step >= s.disc_start:
            self.disc.requires_grad_(False)
            g_loss = -self.disc(rec.float()).mean()
            self.disc.requires_grad_(True)
            weight = adaptive_weight(rec_loss, g_loss, self.vae.decoder.conv_out.weight, s.disc_weight) if self.training else s.disc_weight
            d_loss = hinge_d_loss(self.disc(images.float()), self.disc(rec.detach().float()))
            losses.update(g=g_loss, d=d_loss, g_weight=torch.as_tensor(weight))
            total = total + weight * g_loss + d_loss
        elif self.disc is not None:
            # Before the warm-up ends the discriminator still takes part in the graph (zero
            # weight), so distributed training sees every parameter used in every step.
            total = total + 0.0 * self.disc(rec.detach().float()).mean()
        losses["loss"] = total
        return losses


class VAETask:
    """Train an AutoencoderKL: L1 + perceptual + KL, and a patch discriminator after a warm-up."""

    name = "vae"

    def __init__(
        self, s: VAESettings, image_size: int, reference: dict[str, torch.Tensor], scale_images: torch.Tensor | None = None,
        monitor: SampleMonitor | None = None,
    ):
        """``reference``: held-out patches for the reconstruction grid and the evaluation;
        ``scale_images`` (N, 3, S, S) the patches whose latent spread sets the exported
        ``scaling_factor`` (default: reference); ``monitor`` adds the Fréchet distance of the
        reconstructions of the first ``eval_samples`` reference patches to the evaluation."""
        torch.manual_seed(s.seed)
        self.s = s
        self.model = _VAEWithLoss(build_vae(s, image_size), s)
        self.reference = reference
        self.scale_images = reference["image"] if scale_images is None else scale_images
        self.monitor = monitor

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.reference = {k: v.to(device) for k, v in self.reference.items()}
        if self.s.perceptual_weight > 0 and self.model.perceptual is None:
            self.model.perceptual = PerceptualLoss(self.s.perceptual_encoder, device)

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        images = batch["image"]
        if self.s.augment_flip:
            images, _, _ = flip_rotate(images, batch["map"], batch["crop_boxes"], gen)
        return model(images, gen, step)["loss"]

    def _reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.vae.decode(model.vae.encode(images).latent_dist.mode()).sample

    def sample_grid(self, model: nn.Module, step: int = 0) -> np.ndarray:
        images = self.reference["image"][:8]
        return grid([to_uint8(images), to_uint8(self._reconstruct(model, images))])

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Reconstruction L1 and PSNR (dB, images on [0, 1]) of the held-out reference patches,
        and with a monitor the Fréchet distance of the reconstructions (``fd``)."""
        l1 = se = 0.0
        images = self.reference["image"][: self.s.eval_samples]
        recs = []
        for x in images.split(16):
            rec = self._reconstruct(model, x).clamp(-1, 1).float()
            recs.append(to_uint8(rec))
            l1 += float((rec - x.float()).abs().mean(dim=(1, 2, 3)).sum())
            se += float(((rec - x.float()) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-10).log10().sum())
        n = len(images)
        out = {"l1": l1 / n, "psnr": -10.0 * se / n}
        if self.monitor is not None:
            out.update(self.monitor(np.concatenate(recs), None, images.device))
        return out

    def export(self, model: nn.Module, folder: Path) -> None:
        vae = copy.deepcopy(model.vae).float()
        set_latent_scaling(vae, self.scale_images)
        vae.save_pretrained(folder)


def set_latent_scaling(vae: AutoencoderKL, images: torch.Tensor, batch: int = 16) -> float:
    """Measure the spread of the latents of ``images`` (N, 3, S, S) in [-1, 1] and record
    1/std as the VAE's ``scaling_factor``, so that scaled latents have unit variance as the
    diffusion model's noise schedule assumes (Stable Diffusion's 0.18215 was found the same
    way). Returns the factor."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        z = torch.cat([vae.encode(x.to(device, vae.dtype)).latent_dist.mode().float() for x in images.split(batch)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    std = float((z - shift).std())
    factor = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
    vae.register_to_config(scaling_factor=factor)
    return factor


class LDMTask:
    """Train the denoiser (UNet + condition encoder [+ ControlNet branch]) on frozen VAE latents.

    ``monitor`` (a ``SampleMonitor``) scores samples for the first ``eval_samples`` reference
    patches at every evaluation; the reference holds at least those."""

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
        monitor: SampleMonitor | None = None,
        label_space: dict | None = None,
    ):
        self.s = s
        self.level_luts = torch.as_tensor(np.asarray(level_luts), dtype=torch.long)
        level_num_labels = [int(row.max()) + 1 for row in self.level_luts]
        for level, _ in s.curriculum:
            if level >= len(level_num_labels):
                raise HistopipeError(f"config.ldm.curriculum: level {level} but the dataset has {len(level_num_labels)} map levels")
        if s.uses_crop_tokens and featurizer is None:
            featurizer = CropFeaturizer(s.crop_feature_encoder, size=s.crop_feature_size)
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
        self.label_space = label_space
        self.monitor = monitor

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        # NHWC convolutions: ~10 % faster per step on CPUs (oneDNN) and on tensor-core GPUs.
        self.model.to(memory_format=torch.channels_last)
        self.vae.to(device)
        if dtype != self.vae.dtype:
            self.vae.to(dtype=dtype)
        self.level_luts = self.level_luts.to(device)
        self.reference = {k: v.to(device) for k, v in self.reference.items()}
        if self.featurizer is not None and self.featurizer.device != device:
            self.featurizer = CropFeaturizer(self.featurizer.name, device, self.featurizer.size)

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
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weights(t)).mean()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (B,) at timesteps t: min-SNR-γ when ``snr_gamma`` > 0, else 1."""
        if not self.s.snr_gamma:
            return torch.ones(t.shape, device=t.device)
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=self.s.snr_gamma)
        return clipped / (snr + 1) if self.s.prediction_type == "v_prediction" else clipped / snr

    def pipeline(self, model: Denoiser, vae: AutoencoderKL | None = None) -> HistoSynthesisPipeline:
        pipe = HistoSynthesisPipeline(
            vae=vae or self.vae,
            unet=model.unet,
            scheduler=copy.deepcopy(self.noise_scheduler),
            condition_encoder=model.condition_encoder,
            controlnet=model.controlnet,
            crop_encoder=model.crop_encoder,
            max_crops=self.s.max_crops if self.s.variant in ("map_crops", "map_crop_embeddings") else 0,
            label_names=self.label_names,
            mpp=self.mpp,
            label_space=self.label_space,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_grid(self, model: Denoiser, step: int = 0) -> np.ndarray:
        ref = {k: v[:8] for k, v in self.reference.items()}
        level = self.s.level_at(step)
        images, maps = self.sample(model, ref, level, self.s.sample_steps)
        colors = label_colors(int(self.level_luts[level].max()) + 1)
        return grid([to_uint8(ref["image"]), colors[maps], images])

    def sample(self, model: Denoiser, ref: dict[str, torch.Tensor], level: int, steps: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """DDIM samples (uint8 (N, H, W, 3)) for reference patches' maps and own crops, item i
        with seed i; returns them with the maps at ``level`` (N, H, W)."""
        pipe = self.pipeline(model)
        pipe.use_sampler("ddim")
        images, maps_out = [], []
        n = len(ref["image"])
        for start in range(0, n, batch_size):
            part = {k: v[start : start + batch_size] for k, v in ref.items()}
            maps, slots, feats = self._condition_inputs(part["image"], part["map"], part["crop_boxes"], part["crop_labels"], part["crop_valid"], level, None)
            gens = [torch.Generator(device=part["image"].device).manual_seed(start + i) for i in range(len(maps))]
            out = pipe(maps, slots, feats, num_images=len(maps), level=level, num_inference_steps=steps, generator=gens)
            images.append(out.images)
            maps_out.append(maps.cpu().numpy())
        return np.concatenate(images), np.concatenate(maps_out)

    def evaluate(self, model: Denoiser, step: int) -> dict[str, float]:
        """Progress metrics of the current (EMA) weights: see ``SampleMonitor``."""
        if self.monitor is None:
            return {}
        n = min(self.s.eval_samples, len(self.reference["image"]))
        ref = {k: v[:n] for k, v in self.reference.items()}
        level = self.s.level_at(step)
        samples, maps = self.sample(model, ref, level, self.s.sample_steps)
        return self.monitor(samples, maps if level == 0 else None, ref["image"].device)

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
