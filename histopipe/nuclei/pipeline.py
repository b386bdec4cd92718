"""Inference: ``NucleiPipeline`` turns point maps + tissue types into image / label triplets.

A diffusers ``DiffusionPipeline``: ``save_pretrained`` writes one folder per component plus
``model_index.json``; ``from_pretrained`` rebuilds it with no histopipe-specific code.

Joint mode: one ``denoiser`` produces image, distance map and semantic labels together.
NuDiff mode: ``structure_denoiser`` first produces labels + distance, then ``denoiser``
(image only) paints the image for that finished structure. Instances are separated from the
synthetic semantic labels and distance map with the point map as markers (paper 002).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histopipe.diffusion.pipeline import latents_to_images, to_uint8
from histopipe.errors import HistopipeError
from histopipe.nuclei.instances import separate_instances
from histopipe.nuclei.model import DenoiserOutput, JointDenoiser, structure_tensor
from histopipe.nuclei.multinomial import MultinomialDiffusion, sample_categorical


@dataclass
class NucleiOutput(BaseOutput):
    """images uint8 (B, S, S, 3); semantic uint8 (B, S, S) class ids; distance float32
    (B, S, S) in [0, 1] (0 on background); instances int32 (B, S, S) (0 = background);
    points uint8 (B, S, S) the centroid raster the layout came from."""

    images: np.ndarray
    semantic: np.ndarray
    distance: np.ndarray
    instances: np.ndarray
    points: np.ndarray


def tissue_prompts(template: str, tissues: list[str], points: torch.Tensor, class_names: list[str]) -> list[str]:
    """One prompt per item: ``template`` with {tissue} and {types} (classes present in points (B, S, S))."""
    out = []
    for name, raster in zip(tissues, points, strict=True):
        present = [class_names[int(c)] for c in torch.unique(raster).tolist() if 0 < c < len(class_names)]
        out.append(template.format(tissue=name, types=", ".join(present) if present else "none"))
    return out


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Frozen text-encoder states (B, L, D) of ``prompts`` (padded to the tokenizer's max length)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device)).last_hidden_state


def label_diffusion(scheduler, num_classes: int) -> MultinomialDiffusion:
    """The label schedule that goes with a Gaussian scheduler's config (same T and shape)."""
    shape = "cosine" if scheduler.config.beta_schedule == "squaredcos_cap_v2" else "linear"
    return MultinomialDiffusion(num_classes, scheduler.config.num_train_timesteps, shape)


class NucleiPipeline(DiffusionPipeline):
    """Components: ``denoiser`` (JointDenoiser), ``scheduler`` (DDPMScheduler, the Gaussian
    training schedule); optional ``vae`` (latent space), ``structure_denoiser`` (NuDiff),
    ``text_encoder`` + ``tokenizer`` (text tissue condition). Config: ``class_names``,
    ``tissue_names``, ``prompt_template``."""

    model_cpu_offload_seq = "text_encoder->structure_denoiser->denoiser->vae"
    _optional_components = ["vae", "structure_denoiser", "text_encoder", "tokenizer"]

    def __init__(
        self,
        denoiser: JointDenoiser,
        scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        structure_denoiser: JointDenoiser | None = None,
        text_encoder=None,
        tokenizer=None,
        class_names: list[str] | None = None,
        tissue_names: list[str] | None = None,
        prompt_template: str = "",
    ):
        super().__init__()
        self.register_modules(
            denoiser=denoiser, scheduler=scheduler, vae=vae, structure_denoiser=structure_denoiser,
            text_encoder=text_encoder, tokenizer=tokenizer,
        )
        self.register_to_config(class_names=list(class_names or []), tissue_names=list(tissue_names or []), prompt_template=prompt_template)

    @property
    def image_size(self) -> int:
        return int(self.denoiser.config.sample_size)

    def tissue_ids(self, tissue, b: int) -> torch.Tensor:
        """(B,) int64 tissue ids from ids or names (one value is repeated for the batch)."""
        names = list(self.config.tissue_names)
        if isinstance(tissue, (str, int)):
            tissue = [tissue] * b
        if torch.is_tensor(tissue) or isinstance(tissue, np.ndarray):
            ids = torch.as_tensor(np.asarray(tissue.cpu() if torch.is_tensor(tissue) else tissue)).long().reshape(-1)
            return self._check_ids(ids)
        ids = []
        for t in tissue:
            if isinstance(t, str):
                if t not in names:
                    raise HistopipeError(f"unknown tissue {t!r}; the model knows {names}")
                ids.append(names.index(t))
            else:
                ids.append(int(t))
        return self._check_ids(torch.tensor(ids, dtype=torch.long))

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(self.config.tissue_names)
        if n and ((ids < 0) | (ids >= n)).any():
            raise HistopipeError(f"tissue ids {ids.tolist()} out of range for the model's {n} tissues {list(self.config.tissue_names)}")
        return ids

    def _conditions(self, den: JointDenoiser, points: torch.Tensor, tissue: torch.Tensor) -> dict:
        """Keyword inputs of ``den`` for the conditional and the null (unconditional) pass."""
        cond = {"points": points if den.point_encoder is not None else None}
        null = dict(cond)
        mode = den.config.tissue_condition
        if mode == "embedding":
            cond["tissue"] = null["tissue"] = tissue.to(points.device)
            null["drop_tissue"] = torch.ones(len(points), dtype=torch.bool, device=points.device)
        elif mode == "text":
            if self.text_encoder is None or self.tokenizer is None:
                raise HistopipeError("this model is conditioned on text but the pipeline has no text encoder")
            names = [self.config.tissue_names[int(i)] for i in tissue]
            prompts = tissue_prompts(self.config.prompt_template, names, points, self.config.class_names)
            cond["text_states"] = encode_prompts(self.tokenizer, self.text_encoder, prompts)
            null["text_states"] = encode_prompts(self.tokenizer, self.text_encoder, [""] * len(points))
        return {"cond": cond, "null": null, "guided": mode != "none"}

    def guided_prediction(self, den, sample, t, labels, conds: dict, guidance_scale: float, structure=None) -> DenoiserOutput:
        """Classifier-free guidance on the tissue condition: u + g (c - u) on the Gaussian noise
        and on the label log-probabilities; g = 1 (or no tissue condition) is one conditional pass."""
        if guidance_scale == 1.0 or not conds["guided"]:
            return den(sample, t, labels, structure=structure, **conds["cond"])
        two = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        keys = set(conds["cond"]) | set(conds["null"])
        merged = {}
        for k in keys:
            c, n = conds["cond"].get(k), conds["null"].get(k)
            if k == "drop_tissue":
                c = torch.zeros_like(n)
            merged[k] = None if c is None else torch.cat([c, n])
        out = den(two(sample), t, two(labels), structure=two(structure), **merged)
        b = len(labels) if labels is not None else len(sample)
        g = guidance_scale
        gauss = logits = None
        if out.gaussian is not None:
            c, u = out.gaussian[:b], out.gaussian[b:]
            gauss = u + g * (c - u)
        if out.logits is not None:
            c, u = out.logits[:b].log_softmax(1), out.logits[b:].log_softmax(1)
            logits = u + g * (c - u)
        return DenoiserOutput(gaussian=gauss, logits=logits)

    def _sample(self, den, b, points, tissue, guidance_scale, steps, sampler, generator, structure=None):
        """Reverse diffusion of one denoiser: (packed Gaussian state or None, labels (B, S, S) or None)."""
        device = self._execution_device
        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(sampler)
        if cls is None:
            raise HistopipeError(f"unknown sampler {sampler!r} (ddim or ddpm)")
        sched = cls.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=device)
        conds = self._conditions(den, points, tissue)
        x = labels = None
        if den.gaussian_channels:
            h = den.latent_size
            x = randn_tensor((b, den.gaussian_channels, h, h), generator=generator, device=device, dtype=torch.float32)
        k = den.config.num_classes
        if k:
            md = label_diffusion(self.scheduler, k)
            s = self.image_size
            labels = sample_categorical(torch.full((b, k, s, s), 1.0 / k, device=device), generator)  # x_T is uniform
        ts = sched.timesteps.tolist()
        for i, t in enumerate(self.progress_bar(ts)):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            out = self.guided_prediction(den, x, torch.tensor(t, device=device), labels, conds, guidance_scale, structure)
            if x is not None:
                x = sched.step(out.gaussian.float(), t, x, generator=generator).prev_sample
            if k:
                labels = md.step(out.logits, labels, t, prev, generator)
        return x, labels

    @torch.no_grad()
    def __call__(
        self,
        points: np.ndarray | torch.Tensor,
        tissue=0,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: str = "ddim",
        instance_method: str | None = "marker",
    ) -> NucleiOutput:
        """Synthesize triplets for centroid rasters ``points`` (B, S, S) int (class id per centroid).

        ``tissue``: (B,) ids, names, or one id/name for all. ``instance_method``: Part A's
        separation method (None skips instances; a structure model without the point
        condition uses ``watershed``, since its labels do not follow the points).
        """
        device = self._execution_device
        pts = torch.as_tensor(np.asarray(points.cpu() if torch.is_tensor(points) else points)).long().to(device)
        b, s = pts.shape[0], self.image_size
        if tuple(pts.shape[1:]) != (s, s):
            raise HistopipeError(f"point maps are {tuple(pts.shape[1:])} px; the model makes {s}×{s} px patches")
        tissue_t = self.tissue_ids(tissue, b)
        if self.structure_denoiser is not None:
            xs, labels = self._sample(self.structure_denoiser, b, pts, tissue_t, guidance_scale, num_inference_steps, sampler, generator)
            _, dist = self.structure_denoiser.unpack(xs)
            dist = dist.clamp(-1, 1)
            cond = structure_tensor(labels, dist, self.structure_denoiser.config.num_classes)
            x, _ = self._sample(self.denoiser, b, pts, tissue_t, guidance_scale, num_inference_steps, sampler, generator, cond)
            image, _ = self.denoiser.unpack(x)
            if self.structure_denoiser.point_encoder is None and instance_method == "marker":
                instance_method = "watershed"
        else:
            x, labels = self._sample(self.denoiser, b, pts, tissue_t, guidance_scale, num_inference_steps, sampler, generator)
            image, dist = self.denoiser.unpack(x)
        images = latents_to_images(self.vae, image) if self.vae is not None else image.clamp(-1, 1)
        semantic = labels.cpu().numpy().astype(np.uint8)
        # The distance transform is 0 off nuclei by definition, so background is zeroed.
        distance = ((dist[:, 0].float().clamp(-1, 1) + 1) / 2).cpu().numpy().astype(np.float32) * (semantic > 0)
        raster = pts.cpu().numpy().astype(np.uint8)
        instances = np.zeros(semantic.shape, np.int32)
        if instance_method is not None:
            for i in range(b):
                # separate_instances takes the centroid raster itself as the marker map.
                markers = raster[i] if instance_method == "marker" else None
                instances[i] = separate_instances(semantic[i], distance[i], markers, method=instance_method)[0]
        self.maybe_free_model_hooks()
        return NucleiOutput(images=to_uint8(images), semantic=semantic, distance=distance, instances=instances, points=raster)
