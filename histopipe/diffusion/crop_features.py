"""Frozen features of crops for the crop-*embedding* variant (``map_crop_embeddings``).

``thumbnail`` is the crop's 4×4 colour thumbnail (48 values, no weights: tiny configs and
tests); any other name is looked up in the encoder registry (``histopipe.encoders``), imported
only when needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histopipe.diffusion.conditioning import CropSlots

THUMBNAIL = "thumbnail"
_THUMB = 4


class CropFeaturizer:
    """Callable: CropSlots → features (B, K, D) float32, zeros in empty slots."""

    def __init__(self, name: str, device: str | torch.device = "cpu", size: int | None = None):
        """``size``: side (px) the crops are resized to for the encoder (default: its input size)."""
        self.name = name
        self.device = torch.device(device)
        self.size = size
        self._encoder = None
        if name != THUMBNAIL:
            from histopipe.encoders import get_encoder  # the registry is heavy: import on use

            self._encoder = get_encoder(name, device=str(self.device))
            self._encoder.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return 3 * _THUMB * _THUMB if self._encoder is None else int(self._encoder.dim)

    @property
    def input_size(self) -> int:
        if self._encoder is None:
            return _THUMB
        if self.size:
            return int(self.size)
        size = self._encoder.spec.input_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _resize(self, crop: torch.Tensor, size: int) -> torch.Tensor:
        if self._encoder is None:  # thumbnail: mean colour of each of the 4×4 cells
            return F.adaptive_avg_pool2d(crop, size)
        return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def __call__(self, slots: CropSlots) -> torch.Tensor:
        b, k = slots.valid.shape
        out = torch.zeros(b, k, self.dim, device=slots.canvases.device)
        where = slots.valid.nonzero().tolist()
        if not where:
            return out
        size = self.input_size
        crops = torch.cat([self._resize(slots.crop(i, j)[None].float(), size) for i, j in where])  # (N, 3, size, size)
        if self._encoder is None:
            feats = crops.flatten(1)
        elif self.size:
            # Encode at `size` itself: the registry's tile transform would resize to the
            # encoder's input size (224 px for most), ~12x the work for 64 px crops.
            uint8 = ((crops.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            with torch.inference_mode():
                feats = self._encoder(self._encoder.normalize(uint8)).float()
        else:
            uint8 = ((crops.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            feats = self._encoder.embed(uint8.to(self.device)).float()
        idx = torch.tensor(where, device=out.device)
        out[idx[:, 0], idx[:, 1]] = feats.to(out.device)
        return out
