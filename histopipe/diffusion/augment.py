"""Training augmentations applied alike to image, map and crop boxes.

Everything runs on batched tensors on the training device and draws from one explicit
``torch.Generator``, whose state is checkpointed, so that a resumed run augments exactly as
an uninterrupted one would. Crops are cut from the augmented image afterwards, so they share
its geometry and colour.
"""

from __future__ import annotations

import torch
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

_OD_FLOOR = 1e-6


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device).to(device)


def transform_boxes(boxes: torch.Tensor, k: int, flip: bool, size: int) -> torch.Tensor:
    """Square boxes (..., 3) = (y0, x0, side) after ``torch.rot90(k)`` then a horizontal flip.

    ``rot90`` (counter-clockwise, dims (-2, -1)) sends pixel (y, x) to (size-1-x, y), so a box's
    top-left becomes (size - x0 - side, y0); a horizontal flip sends x0 to size - x0 - side.
    """
    y0, x0, s = boxes.unbind(-1)
    for _ in range(k % 4):
        y0, x0 = size - x0 - s, y0
    if flip:
        x0 = size - x0 - s
    return torch.stack([y0, x0, s], dim=-1)


def flip_rotate(
    images: torch.Tensor, maps: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 90° rotation and horizontal flip per sample (the 8 symmetries of the square).

    images (B, C, S, S), maps (B, S, S), boxes (B, K, 3); returns new tensors.
    """
    b, size = images.shape[0], images.shape[-1]
    ks = torch.randint(0, 4, (b,), generator=gen, device=gen.device).tolist()
    flips = torch.randint(0, 2, (b,), generator=gen, device=gen.device).tolist()
    out_i, out_m, out_b = [], [], []
    for i in range(b):
        img, m = torch.rot90(images[i], ks[i], (-2, -1)), torch.rot90(maps[i], ks[i], (-2, -1))
        if flips[i]:
            img, m = img.flip(-1), m.flip(-1)
        out_i.append(img)
        out_m.append(m)
        out_b.append(transform_boxes(boxes[i], ks[i], bool(flips[i]), size))
    return torch.stack(out_i), torch.stack(out_m), torch.stack(out_b)


def _matrix(m, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(m, dtype=torch.float32, device=like.device)


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stain variation: scale and shift each stain's optical density in HED space.

    images (B, 3, H, W) in [-1, 1]; alpha, beta (B, 3) per-stain scale and shift (optical
    density units, natural log). alpha = 1, beta = 0 returns the input (up to float error).
    """
    rgb = ((images.float() + 1) / 2).clamp_min(_OD_FLOOR).permute(0, 2, 3, 1)  # (B, H, W, 3)
    od = -torch.log(rgb)
    stains = od @ _matrix(hed_from_rgb, images)
    stains = stains * alpha[:, None, None, :] + beta[:, None, None, :]
    out = torch.exp(-(stains @ _matrix(rgb_from_hed, images))).clamp(0, 1)
    return (out.permute(0, 3, 1, 2) * 2 - 1).to(images.dtype)


def augment_batch(
    images: torch.Tensor,
    maps: torch.Tensor,
    boxes: torch.Tensor,
    gen: torch.Generator,
    flip: bool = True,
    stain: float = 0.0,
    brightness: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flips/rotations, HED stain variation and brightness, consistently for the whole sample.

    images (B, 3, S, S) in [-1, 1]; maps (B, S, S) int; boxes (B, K, 3) (y0, x0, side) px.
    ``stain`` is the HED jitter strength s (scale U(1-s, 1+s), shift U(-s, s)); ``brightness``
    the maximum shift as a fraction of the intensity range.
    """
    if flip:
        images, maps, boxes = flip_rotate(images, maps, boxes, gen)
    b = images.shape[0]
    if stain > 0:
        alpha = _uniform(b * 3, 1 - stain, 1 + stain, gen, images.device).view(b, 3)
        beta = _uniform(b * 3, -stain, stain, gen, images.device).view(b, 3)
        images = hed_jitter(images, alpha, beta)
    if brightness > 0:
        shift = _uniform(b, -brightness, brightness, gen, images.device) * 2  # range is [-1, 1]
        images = (images + shift.view(b, 1, 1, 1).to(images.dtype)).clamp(-1, 1)
    return images, maps, boxes
