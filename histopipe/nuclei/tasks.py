"""What the shared loop (``histopipe.diffusion.training.train``) trains in the nuclei branch.

``JointTask``: image + distance + labels together (paper 002), loss
w_i·MSE(image) + w_d·MSE(distance) (of the predicted velocity or noise) + w_l·(KL + CE)(labels) (weights 9, 1, 3).
NuDiff (paper 003): ``StructureTask`` diffuses labels + distance, ``ImageTask`` the image
conditioned on the clean structure. Batches are dicts of Part A's ``NucleiDataset``: image
(B, 3, S, S) and distance (B, 1, S, S) in [-1, 1], semantic and points int64 (B, S, S), tissue (B,).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from histopipe.diffusion.pipeline import images_to_latents, to_uint8
from histopipe.diffusion.tasks import grid, label_colors
from histopipe.errors import HistopipeError
from histopipe.nuclei.labels import centroids, points_from_raster
from histopipe.nuclei.metrics import PointScores
from histopipe.nuclei.model import JointDenoiser, structure_tensor
from histopipe.nuclei.pipeline import (
    NucleiPipeline,
    encode_prompts,
    label_diffusion,
    tissue_prompts,
)
from histopipe.nuclei.settings import NucleiModelSettings, NucleiTrainSettings


def noise_scheduler(m: NucleiModelSettings) -> DDPMScheduler:
    """The Gaussian training schedule (cosine = diffusers' ``squaredcos_cap_v2``).

    Sampling starts at t = T-1, where the signal is all but gone (ᾱ = 6e-8 for the capped
    cosine schedule at T = 200, 2e-9 at T = 1000). A noise (epsilon) prediction is
    ill-conditioned there: the sampler's clean estimate (x - √(1-ᾱ) ε̂) / √ᾱ carries any error
    of ε̂ into the next state multiplied by √(ᾱ_next / ᾱ) (about 300 at T = 200, 1600 at
    T = 1000, for 20 steps), and the first step throws the Gaussian state far out of range. ``v_prediction`` (Salimans & Ho 2022)
    stays well-conditioned at every t, so it is the default (see ``prediction`` in the schema).
    """
    return DDPMScheduler(
        num_train_timesteps=m.timesteps,
        beta_schedule="squaredcos_cap_v2" if m.schedule == "cosine" else "linear",
        prediction_type=m.prediction,
        clip_sample=False,
        # "trailing" spacing starts sampling at t = T-1, where the labels are uniform noise.
        timestep_spacing="trailing",
    )


def build_denoiser(
    m: NucleiModelSettings, role: str, num_classes: int, num_tissues: int,
    image_channels: int = 3, scale_factor: int = 1, text_dim: int = 0,
) -> JointDenoiser:
    """A fresh denoiser for ``role``: ``joint``, ``structure`` (NuDiff step 1) or ``image`` (NuDiff step 2)."""
    use_points = role == "joint" or (role == "structure" and m.nudiff_structure_condition == "points")
    return JointDenoiser(
        sample_size=m.image_size,
        image_channels=0 if role == "structure" else image_channels,
        distance=role != "image",
        num_classes=0 if role == "image" else num_classes,
        scale_factor=scale_factor,
        point_classes=num_classes if use_points else 0,
        point_channels=m.point_channels,
        point_spread=m.point_spread,
        structure_classes=num_classes if role == "image" else 0,
        tissue_condition=m.tissue_condition,
        num_tissues=num_tissues,
        text_dim=text_dim,
        block_out_channels=m.block_out_channels,
        layers_per_block=m.layers_per_block,
        norm_num_groups=m.norm_num_groups,
        first_attention_level=min(m.first_attention_level, len(m.block_out_channels) - 1),
        attention_heads=m.attention_heads,
        cross_attention_dim=m.cross_attention_dim,
    )


def flip_rotate(batch: dict, gen: torch.Generator) -> dict:
    """Per-item random 90° rotation and flip of every spatial tensor (last two dims) alike."""
    b = batch["semantic"].shape[0]
    k = torch.randint(0, 4, (b,), generator=gen, device=gen.device).tolist()
    flip = (torch.rand(b, generator=gen, device=gen.device) < 0.5).tolist()
    out = dict(batch)
    for key in ("image", "distance", "semantic", "points"):
        items = []
        for i in range(b):
            x = torch.rot90(batch[key][i], k[i], dims=(-2, -1))
            items.append(x.flip(-1) if flip[i] else x)
        out[key] = torch.stack(items)
    return out


class _NucleiTask:
    """Shared parts: tissue conditions, VAE latents, the pipeline, sample grids and export."""

    name = "nuclei"
    role = "joint"

    def __init__(
        self, m: NucleiModelSettings, s: NucleiTrainSettings, class_names: list[str], tissue_names: list[str],
        reference: dict[str, torch.Tensor], vae: AutoencoderKL | None = None, text: tuple | None = None,
    ):
        """``reference``: a few items for sample grids; ``vae`` in latent space; ``text``:
        (tokenizer, CLIPTextModel) for the text tissue condition."""
        self.m, self.s = m, s
        self.class_names, self.tissue_names = list(class_names), list(tissue_names)
        k = len(class_names)
        if m.num_classes is not None and m.num_classes != k:
            raise HistopipeError(f"config.nuclei.model.num_classes={m.num_classes} but the data has {k} classes {class_names}")
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.tokenizer, self.text_encoder = text if text is not None else (None, None)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False).eval()
        if m.tissue_condition == "text" and self.text_encoder is None:
            raise HistopipeError("tissue_condition 'text' needs a text encoder and tokenizer")
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        image_channels = vae.config.latent_channels if vae is not None else 3
        text_dim = self.text_encoder.config.hidden_size if self.text_encoder is not None else 0
        torch.manual_seed(s.seed)
        self.model = build_denoiser(m, self.role, k, max(len(tissue_names), 1), image_channels, factor, text_dim)
        self.noise_scheduler = noise_scheduler(m)
        self.labels = label_diffusion(self.noise_scheduler, k)
        self.reference = reference
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self.reference = {k: v.to(device) for k, v in self.reference.items()}
        self._prompt_cache.clear()

    def tissue_inputs(self, batch: dict, gen: torch.Generator | None) -> dict:
        """Denoiser keywords of the tissue condition, with p_drop_tissue of the items set to null."""
        tissue = batch["tissue"].long().reshape(-1)
        b = len(tissue)
        drop = torch.zeros(b, dtype=torch.bool)
        if gen is not None:
            drop = torch.rand(b, generator=gen, device=gen.device).cpu() < self.m.p_drop_tissue
        drop = drop.to(tissue.device)
        if self.m.tissue_condition == "embedding":
            return {"tissue": tissue, "drop_tissue": drop}
        if self.m.tissue_condition == "text":
            names = [self.tissue_names[int(i)] for i in tissue]
            prompts = tissue_prompts(self.m.prompt_template, names, batch["points"], self.class_names)
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
            return {"text_states": torch.cat([self._encode(p) for p in prompts])}
        return {}

    def _encode(self, prompt: str) -> torch.Tensor:
        # The text encoder is frozen: each distinct prompt is encoded once.
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = encode_prompts(self.tokenizer, self.text_encoder, [prompt]).float()
        return self._prompt_cache[prompt]

    def image_target(self, images: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → what is diffused: the images or their scaled VAE latents."""
        if self.vae is None:
            return images
        with torch.no_grad():
            return images_to_latents(self.vae, images, gen).float()

    def _noise(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, the denoiser's regression target (noise or velocity, see ``noise_scheduler``), t)."""
        b, dev = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(dev)
        t = torch.randint(0, self.m.timesteps, (b,), generator=gen, device=gen.device).to(dev)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return xt, self.noise_scheduler.get_velocity(x0, noise, t), t
        return xt, noise, t

    def _prepare(self, batch: dict, gen: torch.Generator) -> dict:
        return flip_rotate(batch, gen) if self.s.augment_flip else batch

    def pipeline(self, model: JointDenoiser, structure: JointDenoiser | None = None) -> NucleiPipeline:
        vae = None if self.vae is None else (self.vae if self.vae.dtype == torch.float32 else copy.deepcopy(self.vae).float())
        text = None if self.text_encoder is None else copy.deepcopy(self.text_encoder).float()
        pipe = NucleiPipeline(
            denoiser=model, scheduler=copy.deepcopy(self.noise_scheduler), vae=vae, structure_denoiser=structure,
            text_encoder=text, tokenizer=self.tokenizer if text is not None else None,
            class_names=self.class_names, tissue_names=self.tissue_names, prompt_template=self.m.prompt_template,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _grid(self, images: np.ndarray | None, semantic: np.ndarray, ref: dict | None = None) -> np.ndarray:
        ref = ref or self.reference
        colors = label_colors(len(self.class_names))
        rows = [to_uint8(ref["image"]), colors[ref["semantic"].cpu().numpy()]]
        if images is not None:
            rows.append(images)
        rows.append(colors[semantic])
        return grid(rows)

    def export(self, model: JointDenoiser, folder: Path) -> None:
        self.pipeline(model).save_pretrained(folder)

    def placement(self, pipe: NucleiPipeline) -> dict[str, float]:
        """Progress metrics: nuclei sampled for the first ``eval_samples`` reference point maps,
        separated without the points as markers (marker-free watershed), their centroids
        matched to the requested points within 6 px: detection F1 and class accuracy."""
        ref = {k: v[: self.s.eval_samples] for k, v in self.reference.items()}
        gens = [torch.Generator(device=ref["points"].device).manual_seed(i) for i in range(len(ref["points"]))]
        out = pipe(ref["points"], ref["tissue"], num_inference_steps=self.s.sample_steps, generator=gens, instance_method="watershed")
        scores = PointScores(radius=6.0)
        for i in range(len(out.instances)):
            scores.update(points_from_raster(out.points[i]), centroids(out.instances[i], out.semantic[i]))
        result = scores.result()
        return {k: result[k] for k in ("f1", "class_accuracy") if np.isfinite(result[k])}


class JointTask(_NucleiTask):
    """The joint denoiser of paper 002 (image + distance + labels, point map + tissue conditions)."""

    name = "nuclei_joint"
    role = "joint"

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        batch = self._prepare(batch, gen)
        x0 = self.model.pack(self.image_target(batch["image"], gen), batch["distance"].float())
        xt, target, t = self._noise(x0, gen)
        lt = self.labels.q_sample(batch["semantic"], t, gen).to(t.device)
        out = model(xt, t, lt, batch["points"], **self.tissue_inputs(batch, gen))
        ic = self.model.config.image_channels
        w_i, w_d, w_l = self.m.loss_weights
        l_img = F.mse_loss(out.gaussian[:, :ic].float(), target[:, :ic])
        l_dist = F.mse_loss(out.gaussian[:, ic:].float(), target[:, ic:])
        return w_i * l_img + w_d * l_dist + w_l * self.labels.loss(out.logits, batch["semantic"], lt, t, self.m.label_ce_weight)

    def sample_grid(self, model: JointDenoiser, step: int = 0) -> np.ndarray:
        ref = {k: v[:8] for k, v in self.reference.items()}
        gens = [torch.Generator(device=ref["points"].device).manual_seed(i) for i in range(len(ref["points"]))]
        out = self.pipeline(model)(ref["points"], ref["tissue"], num_inference_steps=self.s.sample_steps, generator=gens, instance_method=None)
        return self._grid(out.images, out.semantic, ref)

    def evaluate(self, model: JointDenoiser, step: int) -> dict[str, float]:
        return self.placement(self.pipeline(model))


class StructureTask(_NucleiTask):
    """NuDiff step 1: semantic labels + distance map (unconditional, or on the point map)."""

    name = "nuclei_structure"
    role = "structure"

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        batch = self._prepare(batch, gen)
        xt, target, t = self._noise(self.model.pack(None, batch["distance"].float()), gen)
        lt = self.labels.q_sample(batch["semantic"], t, gen).to(t.device)
        out = model(xt, t, lt, batch["points"], **self.tissue_inputs(batch, gen))
        _, w_d, w_l = self.m.loss_weights
        return w_d * F.mse_loss(out.gaussian.float(), target) + w_l * self.labels.loss(out.logits, batch["semantic"], lt, t, self.m.label_ce_weight)

    def sample_grid(self, model: JointDenoiser, step: int = 0) -> np.ndarray:
        ref = {k: v[:8] for k, v in self.reference.items()}
        pipe = self.pipeline(model)
        gen = torch.Generator(device=ref["points"].device).manual_seed(0)
        _, labels = pipe._sample(model, len(ref["points"]), ref["points"], ref["tissue"].long(), 1.0, self.s.sample_steps, "ddim", gen)
        return self._grid(None, labels.cpu().numpy(), ref)

    def export(self, model: JointDenoiser, folder: Path) -> None:
        model.save_pretrained(folder)


class ImageTask(_NucleiTask):
    """NuDiff step 2: the image, conditioned on the clean structure (labels + distance) and tissue."""

    name = "nuclei_image"
    role = "image"

    def __init__(self, *args, structure: JointDenoiser | None = None, **kw):
        super().__init__(*args, **kw)
        self.structure = structure

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        batch = self._prepare(batch, gen)
        xt, target, t = self._noise(self.image_target(batch["image"], gen), gen)
        cond = structure_tensor(batch["semantic"], batch["distance"].float(), len(self.class_names))
        out = model(xt, t, None, batch["points"], structure=cond, **self.tissue_inputs(batch, gen))
        return F.mse_loss(out.gaussian.float(), target)

    def sample_grid(self, model: JointDenoiser, step: int = 0) -> np.ndarray | None:
        if self.structure is None:
            return None
        ref = {k: v[:8] for k, v in self.reference.items()}
        gens = [torch.Generator(device=ref["points"].device).manual_seed(i) for i in range(len(ref["points"]))]
        out = self.pipeline(model, self.structure)(ref["points"], ref["tissue"], num_inference_steps=self.s.sample_steps, generator=gens, instance_method=None)
        return self._grid(out.images, out.semantic, ref)

    def evaluate(self, model: JointDenoiser, step: int) -> dict[str, float]:
        return {} if self.structure is None else self.placement(self.pipeline(model, self.structure))

    def export(self, model: JointDenoiser, folder: Path) -> None:
        if self.structure is None:
            raise HistopipeError("the NuDiff image model is exported with its structure model: give structure=")
        self.pipeline(model, self.structure.float()).save_pretrained(folder)
