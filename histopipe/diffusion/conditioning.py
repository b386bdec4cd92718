"""The two conditions of paper 004: a semantic map and raw visual crops of its regions.

``ConditionEncoder`` turns them into one tensor at image resolution:

    condition = [map embedding (E) | crop canvas (3) | crop mask (1) | crop style (S + 6)]

- the map (tissue-type ids) through a learned embedding, so 100+ types cost E channels
  instead of a 100-channel one-hot;
- the crop canvas: every crop's raw pixels at its position inside its region, zero elsewhere,
  and a mask of where crops are (crops lie in distinct regions, so one canvas holds them all);
- the crop style: each crop summarised by a small trainable CNN (S values) plus its mean and
  standard deviation per colour channel (6 values), painted over the whole region of the
  crop's tissue type. The style channels tell every pixel of a region what its crop looks like,
  so the model can carry a crop's appearance across its region from the first steps of
  training instead of learning long-range propagation from a sparse canvas.

The map-only variant uses the first E channels. The tensor then reaches the denoiser by
*input injection* (strided convolutions bring it to latent resolution and it is concatenated
to the noisy latents, as the LDM paper conditions on semantic maps; learns fast from scratch),
by a ControlNet branch (for a frozen pretrained UNet), or both.

For the ablation with crop *embeddings*, ``CropTokenEncoder`` turns frozen-encoder features
of each crop, tagged with its type, into cross-attention tokens instead.

Label spaces: maps may come at any level of the clustering hierarchy (coarse-to-fine
curriculum). Each level's labels get their own rows of one embedding table (level offsets),
followed by a learned null row used when the map is dropped for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torchvision.ops import roi_align

from histopipe.errors import HistopipeError

CROP_PIXEL_CHANNELS = 4  # canvas RGB + mask
CROP_STATS = 6  # mean and standard deviation of each colour channel


class _LevelLabels:
    """Row offsets of each map level's labels inside one embedding table (null row last)."""

    def _init_levels(self, level_num_labels) -> None:
        self.level_num_labels = [int(n) for n in level_num_labels]
        self.offsets = np.concatenate([[0], np.cumsum(self.level_num_labels)]).tolist()
        self.null_index = self.offsets[-1]

    def rows(self, labels: torch.Tensor, level: int) -> torch.Tensor:
        if not 0 <= level < len(self.level_num_labels):
            raise HistopipeError(f"map level {level} out of range (model knows {len(self.level_num_labels)} levels)")
        n = self.level_num_labels[level]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise HistopipeError(
                f"tissue-type id {int(labels.max())} out of range: the model was trained on ids 0..{n - 1} at level {level}"
            )
        return labels + self.offsets[level]


class CropStyleEncoder(nn.Module):
    """Crops (N, 3, s, s) in [-1, 1] → features (N, style_dim)."""

    def __init__(self, style_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, style_dim),
        )
        _init_signal_preserving(self.net)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)


def _init_signal_preserving(net: nn.Module, out_gain: float = 1.0) -> None:
    """He-normal weights and zero biases, so that a condition's differences pass through the
    stack at unit scale. PyTorch's default initialisation shrinks the variance about threefold
    per layer: after the half-dozen layers of a downsampler, two different maps gave features
    differing by under 1e-3 against unit-variance latents, and the UNet learned to read them
    only slowly. ``out_gain`` scales the last layer."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)
    layers[-1].weight.data.mul_(out_gain)


def _downsampler(in_channels: int, out_channels: int, base: int, scale_factor: int) -> nn.Sequential:
    """Image-resolution condition → latent resolution: one stride-2 stage per factor of 2."""
    stages = int(round(math.log2(scale_factor)))
    if 2**stages != scale_factor:
        raise HistopipeError(f"VAE scale factor {scale_factor} is not a power of 2")
    widths = [min(base * 2**i, 256) for i in range(stages + 1)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
    net = nn.Sequential(*layers)
    _init_signal_preserving(net, out_gain=2.0)
    return net


class ConditionEncoder(ModelMixin, ConfigMixin, _LevelLabels):
    """Semantic map (+ raw crops) → the condition tensor, and its latent-resolution features.

    Args:
        level_num_labels: label count (incl. background 0) of each map level, finest first.
        embed_dim: channels per tissue type (E).
        with_crops: read raw crops (the map + raw crops variant).
        style_dim: CNN features per crop (S), painted over its region with its colour statistics.
        crop_size: crops are resampled to this side (px) for the style CNN.
        out_channels: channels of the latent-resolution features concatenated to the UNet's
            input (0: no input injection, the condition feeds a ControlNet branch only).
        scale_factor: image px per latent px (the VAE's downsampling).
        base_channels: width of the first downsampling stage.
    """

    @register_to_config
    def __init__(
        self,
        level_num_labels: tuple[int, ...] = (2,),
        embed_dim: int = 8,
        with_crops: bool = False,
        style_dim: int = 16,
        crop_size: int = 16,
        out_channels: int = 0,
        scale_factor: int = 8,
        base_channels: int = 32,
    ):
        super().__init__()
        self._init_levels(level_num_labels)
        self.embedding = nn.Embedding(self.null_index + 1, embed_dim)
        self.style = CropStyleEncoder(style_dim) if with_crops else None
        self.to_latent = _downsampler(self.image_channels, out_channels, base_channels, scale_factor) if out_channels else None

    @property
    def image_channels(self) -> int:
        c = self.config
        return c.embed_dim + (CROP_PIXEL_CHANNELS + c.style_dim + CROP_STATS if c.with_crops else 0)

    def embed_labels(self, labels: torch.Tensor, level: int = 0) -> torch.Tensor:
        """labels int (...) at ``level`` → embeddings (..., E)."""
        return self.embedding(self.rows(labels, level))

    def map_channels(self, maps: torch.Tensor, level: int = 0, drop: torch.Tensor | None = None) -> torch.Tensor:
        """maps int (B, H, W) → (B, E, H, W); samples where ``drop`` (B,) is True get the null type."""
        rows = self.rows(maps, level)
        if drop is not None:
            rows = torch.where(drop.view(-1, 1, 1), torch.full_like(rows, self.null_index), rows)
        return self.embedding(rows).permute(0, 3, 1, 2)

    def crop_channels(self, maps: torch.Tensor, slots: CropSlots) -> torch.Tensor:
        """(B, 4 + S + 6, H, W): canvas, mask and each crop's style over its tissue type's region."""
        b, k = slots.valid.shape
        h, w = maps.shape[-2:]
        dtype = self.embedding.weight.dtype
        fp = slots.footprints().to(dtype)  # (B, K, 1, H, W)
        pixels = slots.canvases.to(dtype) * fp
        count = fp.sum(1)
        canvas = pixels.sum(1) / count.clamp_min(1)
        # Colour statistics of each crop over its exact footprint.
        area = fp.sum((-2, -1)).clamp_min(1)  # (B, K, 1)
        mean = pixels.sum((-2, -1)) / area
        var = (pixels.square().sum((-2, -1)) / area - mean.square()).clamp_min(0)
        features = torch.zeros(b, k, self.config.style_dim, device=maps.device, dtype=dtype)
        where = slots.valid.nonzero()
        if len(where):
            y0, x0, side = slots.boxes[where[:, 0], where[:, 1]].to(dtype).unbind(-1)
            index = (where[:, 0] * k + where[:, 1]).to(dtype)
            rois = torch.stack([index, x0, y0, x0 + side, y0 + side], dim=1)
            size = self.config.crop_size
            # torchvision has no bfloat16/float16 kernel for roi_align outside autocast (a
            # pipeline cast to bf16 for sampling on a GPU): it runs in float32.
            crops = roi_align(pixels.flatten(0, 1).float(), rois.float(), (size, size), spatial_scale=1.0,
                              sampling_ratio=2, aligned=True).to(dtype)
            # Under autocast the style network answers in bf16/fp16 (on CPU its last layer too).
            features = features.index_put((where[:, 0], where[:, 1]), self.style(crops).to(dtype))
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # No crop in this process's batch: the style network still takes part in the graph
            # (zero weight), as DDP needs every trained parameter used in every step.
            features = features + 0.0 * sum(p.sum() for p in self.style.parameters())
        style = torch.cat([features, mean, (var + 1e-6).sqrt()], dim=-1) * slots.valid[..., None].to(dtype)
        region = (maps[:, None] == slots.labels[:, :, None, None]) & slots.valid[:, :, None, None]  # (B, K, H, W)
        region = region.to(dtype)
        painted = torch.einsum("bkhw,bkc->bchw", region, style) / region.sum(1, keepdim=True).clamp_min(1)
        return torch.cat([canvas, count.clamp_max(1), painted], dim=1)

    def image_condition(
        self,
        maps: torch.Tensor,
        slots: CropSlots | None = None,
        level: int = 0,
        drop_map: torch.Tensor | None = None,
        drop_crops: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The condition (B, image_channels, H, W) from maps (B, H, W) at ``level`` and crop slots.

        ``drop_map`` / ``drop_crops`` (B,) bool replace the map by the null type and remove every
        crop of the marked samples (classifier-free guidance).
        """
        cond = self.map_channels(maps, level, drop_map)
        if not self.config.with_crops:
            return cond
        if slots is None:
            raise HistopipeError("this model is conditioned on crops: give crop slots")
        return torch.cat([cond, self.crop_channels(maps, slots.dropped(drop_crops))], dim=1)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """Condition (B, image_channels, H, W) → latent-resolution features (B, out_channels, h, w)."""
        if self.to_latent is None:
            raise HistopipeError("this condition encoder has no input injection (out_channels=0)")
        return self.to_latent(condition)


class CropTokenEncoder(ModelMixin, ConfigMixin, _LevelLabels):
    """Frozen-encoder crop features, tagged with their tissue type, → cross-attention tokens.

    A learned null token always comes first (so attention never sees an empty set) and takes
    the place of empty or dropped slots.

    Args:
        feature_dim: width of the crop features (the frozen encoder's output).
        cross_attention_dim: token width (the UNet's cross-attention dim).
        level_num_labels: as in ConditionEncoder.
        feature_encoder: name of the frozen encoder the features come from (recorded so that
            synthesis embeds crops with the same one).
        feature_size: side (px) crops are resized to for that encoder (None: its input size).
    """

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 48,
        cross_attention_dim: int = 256,
        level_num_labels: tuple[int, ...] = (2,),
        feature_encoder: str = "thumbnail",
        feature_size: int | None = None,
    ):
        super().__init__()
        self._init_levels(level_num_labels)
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, cross_attention_dim)
        self.type_embedding = nn.Embedding(self.null_index, cross_attention_dim)
        self.null_token = nn.Parameter(torch.randn(1, 1, cross_attention_dim) * 0.02)

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        level: int = 0,
    ) -> torch.Tensor:
        """features (B, K, F), labels (B, K), valid (B, K) bool → tokens (B, 1 + K, D)."""
        tokens = self.proj(self.norm(features.to(self.proj.weight.dtype)))
        tokens = tokens + self.type_embedding(self.rows(torch.where(valid, labels, 0), level))
        null = self.null_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        tokens = torch.where(valid[..., None], tokens, null)
        return torch.cat([null, tokens], dim=1)


@dataclass
class CropSlots:
    """The crops of a batch, one per slot, as full-size canvases.

    canvases (B, K, 3, H, W) float in [-1, 1], zero outside each crop; boxes (B, K, 3) int64
    (y0, x0, side) px; labels (B, K) int64 region label (map value); valid (B, K) bool.
    """

    canvases: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    def to(self, device, dtype: torch.dtype | None = None) -> CropSlots:
        return CropSlots(
            self.canvases.to(device=device, dtype=dtype or self.canvases.dtype),
            self.boxes.to(device),
            self.labels.to(device),
            self.valid.to(device),
        )

    def select(self, index: torch.Tensor | slice) -> CropSlots:
        return CropSlots(self.canvases[index], self.boxes[index], self.labels[index], self.valid[index])

    def dropped(self, drop: torch.Tensor | None) -> CropSlots:
        """Slots with every crop of the samples where ``drop`` (B,) is True removed."""
        if drop is None:
            return self
        valid = self.valid & ~drop.view(-1, 1)
        return CropSlots(self.canvases * valid[:, :, None, None, None], self.boxes, self.labels, valid)

    def footprints(self) -> torch.Tensor:
        """(B, K, 1, H, W) float mask of each valid slot's box."""
        h, w = self.canvases.shape[-2:]
        return box_masks(self.boxes, self.valid, h, w).unsqueeze(2).to(self.canvases.dtype)

    def crop(self, b: int, k: int) -> torch.Tensor:
        """Pixels (3, side, side) of slot ``k`` of sample ``b``."""
        y0, x0, s = (int(v) for v in self.boxes[b, k])
        return self.canvases[b, k, :, y0 : y0 + s, x0 : x0 + s]


def box_masks(boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes (B, K, 3) (y0, x0, side), valid (B, K) → bool (B, K, h, w), True inside valid boxes."""
    y0, x0, s = boxes.unbind(-1)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    in_y = (ys >= y0[..., None]) & (ys < (y0 + s)[..., None])
    in_x = (xs >= x0[..., None]) & (xs < (x0 + s)[..., None])
    return in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]


def slots_from_image(
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    max_crops: int,
    gen: torch.Generator | None = None,
) -> CropSlots:
    """Crop slots cut from the images themselves (training, and synthesis from held-out maps).

    images (B, 3, H, W) in [-1, 1]; boxes (B, C, 3); labels, valid (B, C). Valid crops fill the
    first slots; with ``gen`` their order is shuffled (the model then cannot rely on a slot's
    index), and when there are more than ``max_crops`` a random subset is kept.
    """
    b, c = valid.shape
    if gen is None:
        key = torch.arange(c, device=valid.device, dtype=torch.float32).expand(b, c)
    else:
        key = torch.rand(b, c, generator=gen, device=gen.device).to(valid.device)
    order = torch.argsort(key + 2.0 * (~valid).float(), dim=1)[:, :max_crops]
    boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 3))
    labels, valid = torch.gather(labels, 1, order), torch.gather(valid, 1, order)
    if order.shape[1] < max_crops:
        pad = max_crops - order.shape[1]
        boxes = torch.cat([boxes, boxes.new_zeros(b, pad, 3)], 1)
        labels = torch.cat([labels, labels.new_zeros(b, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], 1)
    masks = box_masks(boxes, valid, images.shape[-2], images.shape[-1]).unsqueeze(2)
    canvases = images.unsqueeze(1) * masks.to(images.dtype)
    return CropSlots(canvases, boxes, labels, valid)


@dataclass
class PlacedCrop:
    """A crop image placed into a map: pixels uint8 (side, side, 3) with top-left (y0, x0) px."""

    pixels: np.ndarray
    label: int
    y0: int
    x0: int
    source: str = ""

    @property
    def box(self) -> tuple[int, int, int]:
        return (self.y0, self.x0, self.pixels.shape[0])


def slots_from_placed(placed: list[list[PlacedCrop]], size: int, max_crops: int) -> CropSlots:
    """Crop slots from crops pasted at given positions (synthesis from user maps / the bank)."""
    b = len(placed)
    canvases = torch.zeros(b, max_crops, 3, size, size)
    boxes = torch.zeros(b, max_crops, 3, dtype=torch.long)
    labels = torch.zeros(b, max_crops, dtype=torch.long)
    valid = torch.zeros(b, max_crops, dtype=torch.bool)
    for i, crops in enumerate(placed):
        if len(crops) > max_crops:
            raise HistopipeError(f"{len(crops)} crops given for one image; the model has {max_crops} slots")
        for k, crop in enumerate(crops):
            y0, x0, s = crop.box
            if crop.pixels.shape != (s, s, 3) or y0 < 0 or x0 < 0 or y0 + s > size or x0 + s > size:
                raise HistopipeError(f"crop {crop.source or k}: box {crop.box} of shape {crop.pixels.shape} does not fit a {size}-px image")
            canvases[i, k, :, y0 : y0 + s, x0 : x0 + s] = torch.from_numpy(crop.pixels).permute(2, 0, 1).float() / 127.5 - 1
            boxes[i, k] = torch.tensor([y0, x0, s])
            labels[i, k] = int(crop.label)
            valid[i, k] = True
    return CropSlots(canvases, boxes, labels, valid)
