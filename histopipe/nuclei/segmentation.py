"""Downstream nuclei segmenter: a U-Net with a class head and a distance head.

As in the papers' downstream tests (HoVer-Net-style: semantic classes + a per-nucleus
distance map, instances by watershed), the network is an smp ``Unet`` whose decoder output
feeds two heads: class logits (C, S, S), trained with cross-entropy, and the normalised
distance map (1, S, S) in [0, 1], trained with MSE. Instances come from the predicted maps
through the shared ``histopipe.nuclei.instances.separate_instances``, so the downstream
model separates nuclei exactly as synthesis does.

Two arms are trained with the same seed, steps and batch size: on the real training split,
and on real + synthetic pooled; both are scored on the held-out real test split with the
streamed metrics of ``histopipe.nuclei.metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler

from histopipe.errors import ConfigError, HistopipeError
from histopipe.evaluation.segmentation import IMAGENET_MEAN, IMAGENET_STD, load_encoder_weights
from histopipe.nuclei.instances import separate_instances
from histopipe.nuclei.labels import instance_classes
from histopipe.nuclei.metrics import NucleiScores

log = logging.getLogger(__name__)

ARMS = ("real", "real_synthetic")
INSTANCE_METHODS = ("watershed", "connectivity")
# Decoder widths of smp's Unet; a shallower encoder uses the last ``depth`` of them.
DECODER_CHANNELS = (256, 128, 64, 32, 16)
# Only these keys of a sample are batched: stores may carry more (instances, points, tissue).
TRAIN_KEYS = ("image", "semantic", "distance")


@dataclass(frozen=True)
class SegmenterSettings:
    """U-Net training budget (steps of ``batch_size`` patches) and instance separation."""

    encoder: str = "resnet18"
    encoder_weights: str | None = None
    encoder_depth: int = 5
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    distance_weight: float = 1.0
    augment: bool = True
    num_workers: int = 2
    instance_method: str = "watershed"

    def __post_init__(self):
        if self.instance_method not in INSTANCE_METHODS:
            raise ConfigError(
                f"config.nuclei.evaluation.segmentation.instance_method: {self.instance_method!r} "
                f"is not one of {INSTANCE_METHODS} (the test images have no point maps)"
            )
        if not 1 <= self.encoder_depth <= 5:
            raise ConfigError("config.nuclei.evaluation.segmentation.encoder_depth: must be 1..5")


class NucleiSegmenter(nn.Module):
    """smp Unet trunk + class head + distance head.

    forward: image float (B, 3, S, S) in [-1, 1] (S a multiple of 2**encoder_depth) ->
    (class logits (B, C, S, S), distance (B, 1, S, S) in [0, 1]).
    """

    def __init__(self, num_classes: int, encoder: str = "resnet18", encoder_depth: int = 5):
        super().__init__()
        import segmentation_models_pytorch as smp

        channels = DECODER_CHANNELS[-encoder_depth:]
        try:
            self.unet = smp.Unet(encoder_name=encoder, encoder_weights=None, encoder_depth=encoder_depth,
                                 decoder_channels=channels, classes=num_classes)
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"config.nuclei.evaluation.segmentation.encoder: cannot build {encoder!r} ({str(err)[:200]})"
            ) from None
        self.distance_head = smp.base.SegmentationHead(in_channels=channels[-1], out_channels=1, kernel_size=3)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # smp encoders (and weight files made for them) expect ImageNet statistics.
        x = ((image + 1) / 2 - self.mean) / self.std
        decoded = self.unet.decoder(self.unet.encoder(x))
        return self.unet.segmentation_head(decoded), torch.sigmoid(self.distance_head(decoded))


def build_segmenter(settings: SegmenterSettings, num_classes: int) -> tuple[NucleiSegmenter, str | None]:
    """The segmenter (random init) with encoder weights from a file or ``registry:<name>`` when
    configured; returns the model and the weights' sha256 (None without weights)."""
    model = NucleiSegmenter(num_classes, settings.encoder, settings.encoder_depth)
    sha = None
    if settings.encoder_weights:
        sha = load_encoder_weights(model.unet.encoder, settings.encoder_weights)
    return model, sha


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in TRAIN_KEYS}


def augment(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The same random flip and 90° rotation on every map of a sample (nuclei have no up)."""
    rot = torch.randint(0, 4, (len(batch["image"]),), generator=generator).tolist()
    flip = torch.randint(0, 2, (len(batch["image"]),), generator=generator).tolist()
    out = {}
    for key, value in batch.items():
        items = []
        for x, r, f in zip(value, rot, flip, strict=True):
            x = x.flip(-1) if f else x
            items.append(torch.rot90(x, r, dims=(-2, -1)))
        out[key] = torch.stack(items)
    return out


def segmenter_loss(model: nn.Module, batch: dict[str, torch.Tensor], distance_weight: float) -> torch.Tensor:
    """Cross-entropy of the classes + ``distance_weight`` × MSE of the distance in [0, 1]."""
    logits, distance = model(batch["image"])
    target = (batch["distance"].float() + 1) / 2  # stores give 2d - 1
    return F.cross_entropy(logits, batch["semantic"].long()) + distance_weight * F.mse_loss(distance, target)


def train_segmenter(
    model: nn.Module,
    datasets: Sequence[Dataset],
    num_classes: int,
    settings: SegmenterSettings,
    seed: int,
    device: torch.device,
) -> list[tuple[int, float]]:
    """Train in place for ``settings.steps`` steps on the pooled datasets (samples drawn
    uniformly with replacement); return the loss curve [(step, mean loss)]."""
    data = ConcatDataset(list(datasets))
    if len(data) == 0:
        raise HistopipeError("nuclei segmentation: no training samples")
    sampler = RandomSampler(data, replacement=True, num_samples=settings.steps * settings.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(data, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=_collate, num_workers=settings.num_workers,
                        persistent_workers=settings.num_workers > 0)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    window = max(1, settings.steps // 50)
    curve, running = [], []
    for step, batch in enumerate(loader, start=1):
        if int(batch["semantic"].max()) >= num_classes:
            raise HistopipeError(
                f"training labels reach {int(batch['semantic'].max())} but the real store has "
                f"{num_classes} classes: synthetic and real stores use different class lists"
            )
        if settings.augment:
            batch = augment(batch, aug_gen)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = segmenter_loss(model, batch, settings.distance_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step % window == 0 or step == settings.steps:
            curve.append((step, float(np.mean(running))))
            running = []
    return curve


@torch.inference_mode()
def predict_maps(model: nn.Module, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """images float (B, 3, S, S) in [-1, 1] -> semantic uint8 (B, S, S), distance float32
    (B, S, S) in [0, 1]."""
    model.to(device).eval()
    logits, distance = model(images.to(device))
    return logits.argmax(1).to(torch.uint8).cpu().numpy(), distance[:, 0].float().cpu().numpy()


def evaluate_segmenter(
    model: nn.Module,
    test: Dataset,
    num_classes: int,
    settings: SegmenterSettings,
    device: torch.device,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Scores of the model on ``test`` (samples with ``image`` and the true ``instances``
    (S, S) and ``semantic`` (S, S)), streamed batch by batch (see ``NucleiScores.result``)."""
    scores = NucleiScores(num_classes)
    loader = DataLoader(test, batch_size=settings.batch_size, shuffle=False,
                        collate_fn=lambda s: s, num_workers=settings.num_workers)
    for samples in loader:
        if "instances" not in samples[0]:
            raise HistopipeError("nuclei test samples need their true `instances` map")
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
        semantic, distance = predict_maps(model, images, device)
        for s, sem, dist in zip(samples, semantic, distance, strict=True):
            pred, pred_classes = separate_instances(sem, dist, points=None, method=settings.instance_method)
            true = np.asarray(s["instances"])
            scores.update(true, instance_classes(true, np.asarray(s["semantic"])), pred, pred_classes)
    return scores.result(class_names)


def run_arms(
    real_train: Dataset,
    synthetic: Dataset | None,
    test: Dataset,
    num_classes: int,
    settings: SegmenterSettings,
    seed: int,
    device: torch.device,
    class_names: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Train and score the arms (``real``; ``real_synthetic`` when a synthetic set is given)
    from the same initial weights, seed, steps and batch size."""
    arms: dict[str, list[Dataset]] = {"real": [real_train]}
    if synthetic is not None:
        arms["real_synthetic"] = [real_train, synthetic]
    out = {}
    for arm, sets in arms.items():
        torch.manual_seed(seed)  # same initial weights in every arm
        model, sha = build_segmenter(settings, num_classes)
        t0 = time.perf_counter()
        curve = train_segmenter(model, sets, num_classes, settings, seed, device)
        t1 = time.perf_counter()
        scores = evaluate_segmenter(model, test, num_classes, settings, device, class_names)
        log.info("nuclei arm %s: Dice %.3f AJI %.3f PQ %.3f", arm, scores["dice"], scores["aji"], scores["pq"])
        out[arm] = {
            **scores,
            "n_train_real": len(real_train),
            "n_train_synthetic": len(synthetic) if arm == "real_synthetic" else 0,
            "n_test": len(test),
            "seed": seed,
            "settings": asdict(settings),
            "encoder_weights_sha256": sha,
            "loss_curve": curve,
            "train_seconds": round(t1 - t0, 2),
            "test_seconds": round(time.perf_counter() - t1, 2),
        }
        del model
    return out
