"""What the autoencoder is trained with besides L1 + KL: a perceptual loss in a frozen
encoder's features and a patch discriminator, as the autoencoders of the LDM paper are.

- ``PerceptualLoss``: distance between the multi-scale feature maps of a frozen registry
  encoder (any ``histopipe.encoders`` name with local weights; ``efficientnet_lite0`` ships
  its ImageNet weights) for the image and its reconstruction. Each feature map is normalised
  to unit length per position and the squared differences are averaged per level, then
  summed over levels (LPIPS without its learned channel weights).
- ``PatchDiscriminator``: the PatchGAN of pix2pix / taming-transformers (``layers``
  stride-2 convolutions, a realness logit per patch), trained with the hinge loss. Its loss
  enters after ``disc_start`` steps, weighted adaptively by the ratio of the reconstruction
  and adversarial gradients at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceptualLoss(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] → mean perceptual distance (scalar), gradients to ``x``."""

    def __init__(self, encoder_name: str, device: str | torch.device = "cpu"):
        super().__init__()
        from histopipe.encoders import get_encoder  # the registry is heavy: import on use

        encoder = get_encoder(encoder_name, device=str(device))
        self.name = encoder_name
        self.model = encoder.model.eval().requires_grad_(False)
        self.register_buffer("mean", encoder.mean255 / 127.5 - 1, persistent=False)  # on the [-1, 1] scale
        self.register_buffer("std", encoder.std255 / 127.5, persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen: batch-norm statistics never update

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.model.forward_intermediates(x, intermediates_only=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for fx, fy in zip(self.features(x), self.features(y), strict=True):
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-8)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-8)
            total = total + (fx - fy).square().sum(1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN: images (B, 3, H, W) → realness logits (B, 1, h, w), one per receptive field."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` · ‖∇rec‖ / ‖∇adv‖ at the decoder's last layer (taming-transformers), detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return (weight.clamp(0.0, 1e4) * scale).detach()
