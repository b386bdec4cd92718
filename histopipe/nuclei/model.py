"""The nuclei denoisers: one UNet that jointly denoises image, distance map and labels.

``JointDenoiser`` covers the three models of the branch by which parts it has:

- joint (paper 002): image + distance (Gaussian) and labels (multinomial), conditioned on the
  point map and the tissue type;
- NuDiff structure (paper 003): distance + labels only (``image_channels=0``);
- NuDiff image: image only (``num_classes=0``), conditioned on a finished structure
  (one-hot labels + distance, ``structure_classes``).

Everything enters at image resolution S and reaches the UNet's resolution S/f by
pixel-unshuffle (space-to-depth, f = ``scale_factor``: 1 in pixel space, the VAE's factor in
latent space); outputs go back by pixel-shuffle. Unshuffling is a lossless rearrangement, so
one-pixel-wide label structures and the 1-px point markers survive latent resolution, unlike
any interpolation. The Gaussian state of the sampler is "packed": the image (or its VAE
latent) and the unshuffled distance map concatenated at S/f (see ``pack``/``unpack``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from histopipe.errors import HistopipeError


class PointMapEncoder(ModelMixin, ConfigMixin):
    """Centroid raster (B, S, S) int (class id at each centroid, 0 elsewhere) → features
    (B, num_classes - 1 + out_channels, S, S).

    A 1-px marker is too faint a signal to train on: through a freshly initialised conv net
    its trace is thousands of times weaker than the noisy inputs beside it, so the denoiser
    learns to ignore the points. Each class's markers are therefore first spread by a fixed
    Gaussian of ``spread`` px (peak 1 at every centroid; 0 keeps the bare markers) into a
    field in [-1, 1], the scale of the other inputs. The field goes to the UNet directly and
    through dilated convolutions (receptive field 15 px, about a nucleus) that learn the
    nucleus each point stands for.
    """

    @register_to_config
    def __init__(self, num_classes: int, channels: int = 32, out_channels: int = 32, spread: float = 3.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(num_classes - 1, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=4, dilation=4),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        radius = max(int(math.ceil(3 * spread)), 0)
        r = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * spread**2)) if spread > 0 else torch.ones(1, 1)
        self.register_buffer("kernel", kernel, persistent=False)

    @property
    def feature_channels(self) -> int:
        return self.config.num_classes - 1 + self.config.out_channels

    def field(self, points: torch.Tensor) -> torch.Tensor:
        """(B, num_classes - 1, S, S) in [0, 1]: each class's markers spread by the Gaussian."""
        k = self.config.num_classes
        onehot = F.one_hot(points.long().clamp(0, k - 1), k).movedim(-1, 1)[:, 1:]  # background carries nothing
        onehot = onehot.to(self.net[0].weight.dtype)
        kernel = self.kernel.to(onehot.dtype)[None, None].expand(k - 1, 1, -1, -1)
        return F.conv2d(onehot, kernel, padding=kernel.shape[-1] // 2, groups=k - 1).clamp(max=1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        field = self.field(points)
        return torch.cat([field * 2 - 1, self.net(field)], 1)


class TissueEncoder(ModelMixin, ConfigMixin):
    """Tissue condition → cross-attention tokens (B, L, cross_attention_dim).

    ``embedding``: one learned token per tissue plus a learned null token (index num_tissues),
    used for dropped samples (classifier-free guidance). ``text``: a projection of frozen
    text-encoder states; dropped samples are encoded from the empty prompt by the caller.
    ``none``: a single zero token (to_k/to_v have no bias, so it carries no information).
    """

    @register_to_config
    def __init__(self, mode: str = "embedding", num_tissues: int = 1, text_dim: int = 0, cross_attention_dim: int = 256):
        super().__init__()
        if mode == "embedding":
            self.embedding = nn.Embedding(num_tissues + 1, cross_attention_dim)
        elif mode == "text":
            self.proj = nn.Linear(text_dim, cross_attention_dim)
        elif mode != "none":
            raise HistopipeError(f"unknown tissue condition {mode!r}")

    def forward(
        self,
        batch: int,
        tissue: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tissue (B,) int64; text_states (B, L, text_dim); drop (B,) bool (embedding mode)."""
        mode = self.config.mode
        if mode == "embedding":
            if tissue is None:
                raise HistopipeError("this model is conditioned on the tissue type: give tissue ids")
            idx = tissue.long().clone()
            if drop is not None:
                idx[drop] = self.config.num_tissues
            return self.embedding(idx)[:, None]
        if mode == "text":
            if text_states is None:
                raise HistopipeError("this model is conditioned on text: give text-encoder states")
            return self.proj(text_states.to(self.proj.weight.dtype))
        return self.dummy_token(batch)

    def dummy_token(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1, self.config.cross_attention_dim, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        params = list(self.parameters())
        return params[0].dtype if params else torch.float32

    @property
    def device(self) -> torch.device:
        params = list(self.parameters())
        return params[0].device if params else torch.device("cpu")


@dataclass
class DenoiserOutput(BaseOutput):
    """gaussian: prediction for the packed Gaussian state (B, Cg, S/f, S/f), velocity or noise as
    the scheduler's ``prediction_type`` says (None if none);
    logits: predicted x_0 logits of the labels (B, K, S, S) (None if the model has no labels)."""

    gaussian: torch.Tensor | None
    logits: torch.Tensor | None


class JointDenoiser(ModelMixin, ConfigMixin):
    """UNet2DConditionModel over packed Gaussian channels, noisy one-hot labels and conditions."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        image_channels: int = 3,
        distance: bool = True,
        num_classes: int = 0,
        scale_factor: int = 1,
        point_classes: int = 0,
        point_channels: int = 32,
        point_spread: float = 3.0,
        structure_classes: int = 0,
        tissue_condition: str = "embedding",
        num_tissues: int = 1,
        text_dim: int = 0,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 256),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        first_attention_level: int = 2,
        attention_heads: int = 8,
        cross_attention_dim: int = 256,
    ):
        super().__init__()
        f2 = scale_factor**2
        if sample_size % scale_factor:
            raise HistopipeError(f"image size {sample_size} px is not a multiple of the scale factor {scale_factor}")
        if self.gaussian_channels == 0 and num_classes == 0:
            raise HistopipeError("a denoiser needs an image, a distance map or labels to denoise")
        self.point_encoder = PointMapEncoder(point_classes, point_channels, point_channels, point_spread) if point_classes else None
        self.tissue_encoder = TissueEncoder(tissue_condition, num_tissues, text_dim, cross_attention_dim)
        in_ch = self.gaussian_channels + f2 * num_classes
        in_ch += f2 * self.point_encoder.feature_channels if point_classes else 0
        in_ch += f2 * (structure_classes + 1) if structure_classes else 0
        n = len(block_out_channels)
        attn = [i >= first_attention_level for i in range(n)]
        self.unet = UNet2DConditionModel(
            sample_size=sample_size // scale_factor,
            in_channels=in_ch,
            out_channels=self.gaussian_channels + f2 * num_classes,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_heads,  # diffusers reads this as the number of heads
            norm_num_groups=norm_num_groups,
        )

    @property
    def gaussian_channels(self) -> int:
        """Channels of the packed Gaussian state: image (or latent) + unshuffled distance."""
        c = self.config
        return c.image_channels + (c.scale_factor**2 if c.distance else 0)

    @property
    def latent_size(self) -> int:
        return self.config.sample_size // self.config.scale_factor

    def pack(self, image: torch.Tensor | None, distance: torch.Tensor | None) -> torch.Tensor:
        """image (B, image_channels, S/f, S/f) and distance (B, 1, S, S) → packed (B, Cg, S/f, S/f)."""
        parts = []
        if self.config.image_channels:
            parts.append(image)
        if self.config.distance:
            parts.append(F.pixel_unshuffle(distance, self.config.scale_factor))
        return torch.cat(parts, 1)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Packed (B, Cg, S/f, S/f) → (image (B, image_channels, S/f, S/f) or None, distance (B, 1, S, S) or None)."""
        ic = self.config.image_channels
        image = x[:, :ic] if ic else None
        distance = F.pixel_shuffle(x[:, ic:], self.config.scale_factor) if self.config.distance else None
        return image, distance

    def forward(
        self,
        sample: torch.Tensor | None,
        timestep: torch.Tensor,
        labels: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        tissue: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        structure: torch.Tensor | None = None,
        drop_tissue: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """Predictions at integer timesteps (B,).

        sample: packed noisy Gaussian state (B, Cg, S/f, S/f); labels: noisy labels int64 (B, S, S);
        points: centroid raster int64 (B, S, S); tissue (B,) int64 or text_states (B, L, D);
        structure: clean structure (B, structure_classes + 1, S, S) = one-hot labels and distance
        in [-1, 1]; drop_tissue (B,) bool: use the null tissue condition.
        """
        c = self.config
        f = c.scale_factor
        ref = sample if sample is not None else labels
        b = ref.shape[0]
        dtype = self.unet.dtype
        parts = [] if sample is None or self.gaussian_channels == 0 else [sample.to(dtype)]
        if c.num_classes:
            if labels is None:
                raise HistopipeError("this denoiser diffuses labels: give the noisy labels")
            onehot = F.one_hot(labels.long(), c.num_classes).movedim(-1, 1).to(dtype) * 2 - 1
            parts.append(F.pixel_unshuffle(onehot, f))
        if self.point_encoder is not None:
            if points is None:
                raise HistopipeError("this denoiser is conditioned on a point map: give points")
            parts.append(F.pixel_unshuffle(self.point_encoder(points), f))
        if c.structure_classes:
            if structure is None:
                raise HistopipeError("this denoiser is conditioned on a structure: give labels + distance")
            parts.append(F.pixel_unshuffle(structure.to(dtype), f))
        context = self.tissue_encoder(b, tissue, text_states, drop_tissue).to(dtype)
        t = torch.as_tensor(timestep, device=ref.device)
        t = t.expand(b) if t.dim() == 0 else t
        out = self.unet(torch.cat(parts, 1), t, encoder_hidden_states=context).sample
        cg = self.gaussian_channels
        gaussian = out[:, :cg] if cg else None
        logits = F.pixel_shuffle(out[:, cg:], f) if c.num_classes else None
        return DenoiserOutput(gaussian=gaussian, logits=logits)


def structure_tensor(labels: torch.Tensor, distance: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The NuDiff image model's condition: one-hot labels in [-1, 1] and distance (B, 1, S, S) in
    [-1, 1] → (B, num_classes + 1, S, S)."""
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(distance.dtype) * 2 - 1
    return torch.cat([onehot, distance], 1)
