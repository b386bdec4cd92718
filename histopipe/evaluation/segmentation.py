"""Downstream DeepLabv3+ evaluation: train on real, synthetic or both, test on real patches.

The model (segmentation-models-pytorch ``DeepLabV3Plus``) predicts the label maps of the
stores (0 = background, t + 1 = tissue type t). It is trained for a fixed budget of steps on
(a) the real train split, (b) a synthetic store, or (c) both pooled, and always tested on the
real test split of the same patch store (split by slide, so no test slide was seen). Scores
come from one confusion matrix accumulated over all test pixels at the label maps' own
resolution: per-class IoU and Dice, their means over the classes present, pixel accuracy.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from histopipe import __version__
from histopipe.atomic import atomic_path
from histopipe.errors import HistopipeError, WeightsError
from histopipe.evaluation.features import ImageSet, open_store
from histopipe.evaluation.settings import (
    SEGMENTATION_MODES,
    EvaluationSettings,
    SegmentationSettings,
    resolve_device,
)

log = logging.getLogger(__name__)

# smp encoders are ImageNet-pretrained with these statistics; random-init ones do not care.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Prefixes that wrap the same tensors in checkpoints of different libraries.
_WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "trunk.")


class PatchPairs(Dataset):
    """(image float32 (3, s, s) ImageNet-normalised, labels int64 (t, t)) from store rows.

    Images are resized to ``size`` (bilinear, antialiased), labels to ``label_size`` (nearest;
    None keeps the store's resolution). Stores open lazily, so each worker opens its own.
    """

    def __init__(self, sets: list[ImageSet], size: int, label_size: int | None):
        self.sets = sets
        self.offsets = np.cumsum([0] + [len(s) for s in sets])
        self.size = size
        self.label_size = label_size
        self._groups: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if k not in self._groups:
            self._groups[k] = open_store(self.sets[k].path)
        group = self._groups[k]
        row = int(self.sets[k].indices[i - self.offsets[k]])
        image = torch.from_numpy(np.ascontiguousarray(group["images"][row]))
        labels = torch.from_numpy(np.asarray(group["maps"][row], dtype=np.int64))
        return to_network_input(image, self.size), resize_labels(labels, self.label_size)


def to_network_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, size, size), ImageNet-normalised."""
    x = image.permute(2, 0, 1).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_labels(labels: torch.Tensor, size: int | None) -> torch.Tensor:
    """int64 (H, W) -> (size, size) by nearest neighbour (None: unchanged)."""
    if size is None or labels.shape == (size, size):
        return labels
    out = F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest-exact")
    return out[0, 0].long()


def augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """Random flip and 90° rotation per sample (the dihedral group: histology has no up)."""
    rot = torch.randint(0, 4, (len(images),), generator=generator)
    flip = torch.randint(0, 2, (len(images),), generator=generator)
    out_i, out_l = [], []
    for img, lab, r, f in zip(images, labels, rot.tolist(), flip.tolist(), strict=True):
        if f:
            img, lab = img.flip(-1), lab.flip(-1)
        out_i.append(torch.rot90(img, r, dims=(-2, -1)))
        out_l.append(torch.rot90(lab, r, dims=(-2, -1)))
    return torch.stack(out_i), torch.stack(out_l)


def _normalise_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _read_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors and sha256 of a weight file, or of a registry encoder (``registry:<name>``)."""
    if source.startswith("registry:"):
        from histopipe.evaluation.distribution import registry_factory

        encoder = registry_factory(source.split(":", 1)[1])
        return dict(encoder.state_dict()), str(getattr(encoder, "weights_sha256", ""))
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"{path}: encoder weight file not found")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: cannot read weights ({err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict")
    return state, sha


def load_encoder_weights(encoder: nn.Module, source: str) -> str:
    """Copy weights into the segmentation encoder; return their sha256.

    Names are matched after removing wrapper prefixes (``module.``, ``model.``, ...) so that a
    torchvision/timm classifier checkpoint fits the smp encoder. Every encoder tensor must be
    found with the right shape; a few extra tensors (a classifier head) are ignored, many are
    an error.
    """
    state, sha = _read_state_dict(source)
    available = {_normalise_key(k): v for k, v in state.items() if torch.is_tensor(v)}
    target = encoder.state_dict()
    new_state, missing = {}, []
    for key, tensor in target.items():
        found = available.get(_normalise_key(key))
        if found is not None and tuple(found.shape) == tuple(tensor.shape):
            new_state[key] = found.to(tensor.dtype)
        elif not key.endswith("num_batches_tracked"):
            missing.append(key)
        else:
            new_state[key] = tensor
    if missing:
        raise WeightsError(
            f"{source}: {len(missing)} of {len(target)} encoder tensors have no match of the "
            f"same name and shape (first: {missing[:3]}); is it the same architecture?"
        )
    # A deeper model of the same family (resnet34 for resnet18) matches every tensor too;
    # beyond a classifier head, unused tensors mean another architecture.
    used = {_normalise_key(k) for k in target}
    unused = [k for k in available if k not in used and not k.endswith("num_batches_tracked")]
    if len(unused) > max(10, len(target) // 20):
        raise WeightsError(
            f"{source}: {len(unused)} tensors of the file have no place in the "
            f"{type(encoder).__name__} (first: {unused[:3]}); is it the same architecture?"
        )
    encoder.load_state_dict(new_state)
    return sha


def build_model(settings: SegmentationSettings, num_classes: int) -> tuple[nn.Module, str | None]:
    """DeepLabV3Plus with the configured encoder (random init unless weights are given)."""
    import segmentation_models_pytorch as smp

    try:
        model = smp.DeepLabV3Plus(
            encoder_name=settings.encoder, encoder_weights=None, classes=num_classes
        )
    except (KeyError, ValueError, RuntimeError) as err:
        raise HistopipeError(
            f"config.evaluation.segmentation.encoder: cannot build {settings.encoder!r} "
            f"({str(err)[:200]})"
        ) from None
    sha = None
    if settings.encoder_weights:
        sha = load_encoder_weights(model.encoder, settings.encoder_weights)
    return model, sha


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_background: bool):
    ignore = 0 if ignore_background else -100
    total = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="sum")
    count = (labels != ignore).sum() if ignore_background else labels.numel()
    # A batch of only background contributes zero (a plain mean would be NaN).
    return total / max(int(count), 1)


def train_model(
    model: nn.Module,
    train_sets: list[ImageSet],
    num_classes: int,
    size: int,
    settings: SegmentationSettings,
    seed: int,
    device: torch.device,
) -> list[tuple[int, float]]:
    """Train in place for ``settings.steps`` steps; return the loss curve [(step, mean loss)]."""
    data = PatchPairs(train_sets, size, size)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(data, replacement=True,
                            num_samples=settings.steps * settings.batch_size, generator=generator)
    loader = DataLoader(data, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                        num_workers=settings.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=settings.num_workers > 0)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    window = max(1, settings.steps // 100)
    curve, running = [], []
    for step, (images, labels) in enumerate(loader, start=1):
        if int(labels.max()) >= num_classes:
            raise HistopipeError(
                f"training labels reach {int(labels.max())} but the patch store has "
                f"{num_classes} labels: synthetic and real stores use different label spaces"
            )
        if settings.augment:
            images, labels = augment(images, labels, aug_gen)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = _masked_cross_entropy(model(images), labels, settings.ignore_background)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % window == 0 or step == settings.steps:
            curve.append((step, float(np.mean(running))))
            running = []
    return curve


@torch.inference_mode()
def accumulate_confusion(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    ignore_background: bool,
    device: torch.device,
    source: str = "test",
) -> np.ndarray:
    """Confusion counts int64 (C, C), rows = true label, columns = predicted, over every pixel
    of (network input (B, 3, s, s), labels int64 (B, t, t)) batches at the labels' resolution
    (background pixels left out when ignored)."""
    model.to(device).eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, labels in batches:
        labels = labels.to(device)
        if labels.numel() and int(labels.max()) >= num_classes:
            raise HistopipeError(f"{source}: labels reach {int(labels.max())} but the segmenter knows {num_classes} labels")
        logits = model(images.to(device))
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                   align_corners=False)
        if ignore_background:
            logits[:, 0] = -torch.inf
        pred = logits.argmax(1)
        valid = labels != 0 if ignore_background else torch.ones_like(labels, dtype=torch.bool)
        conf += torch.bincount(labels[valid] * num_classes + pred[valid],
                               minlength=num_classes * num_classes)
    return conf.view(num_classes, num_classes).cpu().numpy()


def confusion_matrix(
    model: nn.Module,
    test: ImageSet,
    num_classes: int,
    size: int,
    batch_size: int,
    ignore_background: bool,
    device: torch.device,
) -> np.ndarray:
    """``accumulate_confusion`` over the images and maps of an image set."""
    loader = DataLoader(PatchPairs([test], size, None), batch_size=batch_size, shuffle=False)
    return accumulate_confusion(model, loader, num_classes, ignore_background, device, str(test.path))


@dataclass
class Segmenter:
    """A trained DeepLabv3+ with what is needed to apply it: label count, network input size
    (px), whether background is scored, and the label names of its store."""

    model: nn.Module
    num_classes: int
    size: int
    ignore_background: bool
    label_names: list[str]
    encoder: str

    def confusion(self, images: np.ndarray, maps: np.ndarray, device: torch.device, batch_size: int = 32, source: str = "images") -> np.ndarray:
        """Confusion (C, C) of its predictions on uint8 images (N, H, W, 3) against maps (N, H, W)."""
        def batches():
            for start in range(0, len(images), batch_size):
                x = torch.stack([to_network_input(torch.from_numpy(np.ascontiguousarray(im)), self.size) for im in images[start : start + batch_size]])
                yield x, torch.from_numpy(np.asarray(maps[start : start + batch_size], dtype=np.int64))

        return accumulate_confusion(self.model, batches(), self.num_classes, self.ignore_background, device, source)


def save_segmenter(seg: Segmenter, path: str | Path) -> None:
    """One file: the weights and what ``load_segmenter`` needs to rebuild and apply them."""
    meta = {k: getattr(seg, k) for k in ("num_classes", "size", "ignore_background", "label_names", "encoder")}
    with atomic_path(Path(path)) as tmp:
        torch.save({"meta": meta, "state_dict": seg.model.state_dict()}, tmp)


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    path = Path(path)
    if not path.is_file():
        raise HistopipeError(f"{path}: segmenter file not found (written by evaluate-segmentation --mode real)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta = saved["meta"]
    except Exception as err:
        raise HistopipeError(f"{path}: not a segmenter file ({type(err).__name__}: {err})") from None
    import segmentation_models_pytorch as smp

    model = smp.DeepLabV3Plus(encoder_name=meta["encoder"], encoder_weights=None, classes=int(meta["num_classes"]))
    model.load_state_dict(saved["state_dict"])
    return Segmenter(model.to(device).eval(), int(meta["num_classes"]), int(meta["size"]), bool(meta["ignore_background"]),
                     list(meta["label_names"] or []), meta["encoder"])


def segmentation_scores(
    confusion: np.ndarray,
    ignore_background: bool = True,
    label_names: list[str] | None = None,
) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) from a confusion
    matrix (C, C) (rows true, columns predicted). With ``ignore_background`` the row and column
    of label 0 are dropped first (those pixels are not scored). A class neither present nor
    predicted has no score (NaN, null in JSON) and is left out of the means (mIoU, mDice); a
    class predicted but absent scores 0."""
    conf = np.asarray(confusion, dtype=np.float64)
    first = 1 if ignore_background else 0
    sub = conf[first:, first:]
    tp = np.diag(sub)
    fp = sub.sum(axis=0) - tp
    fn = sub.sum(axis=1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (tp + union), np.nan)
    per_class = [
        {
            "label": k + first,
            "name": label_names[k + first] if label_names and k + first < len(label_names)
            else str(k + first),
            "iou": float(iou[k]),
            "dice": float(dice[k]),
            "support": int(sub[k].sum()),
        }
        for k in range(sub.shape[0])
    ]
    scored = np.isfinite(iou)
    total = sub.sum()
    return {
        "per_class": per_class,
        "miou": float(iou[scored].mean()) if scored.any() else float("nan"),
        "mdice": float(dice[scored].mean()) if scored.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "n_classes_scored": int(scored.sum()),
    }


def evaluate_segmentation(
    mode: str,
    real_path: str | Path,
    synthetic_path: str | Path | None,
    settings: EvaluationSettings,
    variant: str | None = None,
    model_out: str | Path | None = None,
) -> dict:
    """Train DeepLabv3+ on ``mode`` data (real | synthetic | both) and score it on the real
    test split; the returned dict is what ``evaluate-segmentation`` writes as JSON. With
    ``model_out`` the trained model is saved there (``load_segmenter``): the real arm is the
    segmenter that scores the label fidelity of synthetic images."""
    if mode not in SEGMENTATION_MODES:
        raise HistopipeError(f"mode must be one of {SEGMENTATION_MODES}, got {mode!r}")
    if mode != "real" and synthetic_path is None:
        raise HistopipeError(f"mode {mode!r} needs a synthetic store")
    seg = settings.segmentation
    device = resolve_device(settings.device)
    real_store = open_store(real_path)
    num_classes = real_store.attrs.get("num_labels")
    if num_classes is None:
        num_classes = int(real_store["maps"][:].max()) + 1
        log.warning("%s has no num_labels attribute; using %d from the maps", real_path, num_classes)
    num_classes = int(num_classes)
    label_names = list(real_store.attrs.get("label_names", [])) or None

    test = ImageSet.open(real_path, split="test")
    train_sets: list[ImageSet] = []
    if mode in ("real", "both"):
        train_sets.append(ImageSet.open(real_path, split="train"))
    synthetic = ImageSet.open(synthetic_path, split="all") if mode != "real" else None
    if synthetic is not None:
        train_sets.append(synthetic)
    patch_size = test.image_size
    size = seg.image_size or patch_size
    if size % 16:
        raise HistopipeError(
            f"{real_path}: patch size {patch_size} px is not a multiple of 16; set "
            "evaluation.segmentation.image_size"
        )
    if variant is None:
        variant = "real" if synthetic is None else str(synthetic.attrs.get("variant", Path(synthetic_path).stem))

    torch.manual_seed(settings.seed)
    model, weights_sha = build_model(seg, num_classes)
    t0 = time.perf_counter()
    curve = train_model(model, train_sets, num_classes, size, seg, settings.seed, device)
    t1 = time.perf_counter()
    conf = confusion_matrix(model, test, num_classes, size, seg.batch_size,
                            seg.ignore_background, device)
    t2 = time.perf_counter()
    scores = segmentation_scores(conf, seg.ignore_background, label_names)
    if model_out is not None:
        save_segmenter(Segmenter(model.cpu(), num_classes, size, seg.ignore_background, label_names or [], seg.encoder), model_out)
    log.info("%s (%s): mIoU %.3f, mDice %.3f", variant, mode, scores["miou"], scores["mdice"])
    return {
        "kind": "segmentation",
        "variant": variant,
        "mode": mode,
        "seed": settings.seed,
        "settings": asdict(seg),
        "encoder_weights_sha256": weights_sha,
        "num_classes": num_classes,
        "patch_size": patch_size,
        "network_size": size,
        "train": {
            "real": train_sets[0].describe() if mode in ("real", "both") else None,
            "synthetic": synthetic.describe() if synthetic is not None else None,
            "n_patches": int(sum(len(s) for s in train_sets)),
        },
        "test": test.describe(),
        **scores,
        "confusion": conf.tolist(),
        "loss_curve": curve,
        "train_seconds": round(t1 - t0, 2),
        "test_seconds": round(t2 - t1, 2),
        "device": str(device),
        "histopipe_version": __version__,
    }
