"""The two conditions of paper 004: a semantic map and raw visual crops of its regions.

The map (tissue-type ids) becomes spatial channels through a learned embedding, so 100+
types cost ``map_embed_dim`` channels instead of a 100-channel one-hot. Each crop becomes a
full-size sparse canvas: zeros except the crop's pixels at its position inside its region,
plus its tissue-type embedding over the same footprint. One slot per region present, up to
``max_crops``; empty slots are zero. The ControlNet branch reads the concatenation

    condition = [map embedding (E) | slot 1 (3 + E) | ... | slot K (3 + E)]   (B, E + K(3+E), H, W)

For the ablation with crop *embeddings*, ``CropTokenEncoder`` turns frozen-encoder features
of each crop, tagged with its type, into cross-attention tokens instead.

Label spaces: maps may come at any level of the clustering hierarchy (coarse-to-fine
curriculum). Each level's labels get their own rows of one embedding table (level offsets),
followed by a learned null row used when the map is dropped for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from histopipe.errors import HistopipeError


def condition_channels(map_embed_dim: int, max_crops: int, with_crops: bool) -> int:
    """Channels of the ControlNet condition: map embedding + (3 + embedding) per crop slot."""
    return map_embed_dim + (max_crops * (3 + map_embed_dim) if with_crops else 0)


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


class SemanticMapEncoder(ModelMixin, ConfigMixin, _LevelLabels):
    """Tissue-type ids → learned embedding → spatial channels.

    Args:
        level_num_labels: label count (incl. background 0) of each map level, finest first.
        embed_dim: channels per tissue type.
    """

    @register_to_config
    def __init__(self, level_num_labels: tuple[int, ...] = (2,), embed_dim: int = 8):
        super().__init__()
        self._init_levels(level_num_labels)
        self.embedding = nn.Embedding(self.null_index + 1, embed_dim)

    def embed_labels(self, labels: torch.Tensor, level: int = 0) -> torch.Tensor:
        """labels int (...) at ``level`` → embeddings (..., E)."""
        return self.embedding(self.rows(labels, level))

    def forward(self, maps: torch.Tensor, level: int = 0, drop: torch.Tensor | None = None) -> torch.Tensor:
        """maps int (B, H, W) → (B, E, H, W); samples where ``drop`` (B,) is True get the null type."""
        rows = self.rows(maps, level)
        if drop is not None:
            rows = torch.where(drop.view(-1, 1, 1), torch.full_like(rows, self.null_index), rows)
        return self.embedding(rows).permute(0, 3, 1, 2)


class CropTokenEncoder(ModelMixin, ConfigMixin, _LevelLabels):
    """Frozen-encoder crop features, tagged with their tissue type, → cross-attention tokens.

    A learned null token always comes first (so attention never sees an empty set) and takes
    the place of empty or dropped slots.

    Args:
        feature_dim: width of the crop features (the frozen encoder's output).
        cross_attention_dim: token width (the UNet's cross-attention dim).
        level_num_labels: as in SemanticMapEncoder.
        feature_encoder: name of the frozen encoder the features come from (recorded so that
            synthesis embeds crops with the same one).
    """

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 48,
        cross_attention_dim: int = 256,
        level_num_labels: tuple[int, ...] = (2,),
        feature_encoder: str = "thumbnail",
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


def build_condition(
    map_encoder: SemanticMapEncoder,
    maps: torch.Tensor,
    slots: CropSlots | None,
    level: int = 0,
    drop_map: torch.Tensor | None = None,
    drop_crops: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ControlNet condition (B, E [+ K(3+E)], H, W) from maps (B, H, W) and crop slots.

    ``drop_map`` / ``drop_crops`` (B,) bool replace the map by the null type and empty every
    slot of the marked samples (classifier-free guidance).
    """
    cond = map_encoder(maps, level, drop=drop_map)
    if slots is None:
        return cond
    slots = slots.dropped(drop_crops)
    fp = slots.footprints().to(cond.dtype)  # (B, K, 1, H, W)
    types = map_encoder.embed_labels(torch.where(slots.valid, slots.labels, 0), level)  # (B, K, E)
    per_slot = torch.cat([slots.canvases.to(cond.dtype) * fp, types[..., None, None] * fp], dim=2)
    return torch.cat([cond, per_slot.flatten(1, 2)], dim=1)
