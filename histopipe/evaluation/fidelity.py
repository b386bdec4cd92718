"""Does a synthetic image follow its map, and does it use its crops? Label and crop fidelity.

- **Label fidelity**: a segmenter trained on real training patches only (the real arm of the
  DeepLabv3+ evaluation, ``evaluate-segmentation --mode real --model-out``) predicts the tissue
  types of each synthetic image; its prediction is scored against the map that image was
  generated from (mIoU, mDice, pixel accuracy from one confusion matrix over all images).
  Upper bound: the same segmenter on the real test patches against their maps (the real arm's
  own test score). Chance level: unconditional samples against the held-out maps they were
  paired with (the ``unconditional`` row).
- **Crop fidelity**: for every crop a synthetic image was conditioned on, how far a square
  of the synthesised pixels of its region lies from a random crop of the same tissue type
  from another slide (the crop bank), over how far it lies from its own crop, in a registry
  encoder's *appearance statistics* (the per-channel mean and standard deviation of its
  first stages' activations: stain and fine texture, what a crop is meant to carry). Above 1:
  the image looks more like its own crop than like its tissue type in general, i.e. the crop
  was used; ``win`` is the fraction of crops for which that holds. The encoder's pooled
  output (``fidelity_features: pooled``, by cosine similarity) says what the tissue is rather
  than how it looks: every crop of a cohort scores 0.7-0.8 against every region there, which
  squeezes the ratio towards 1 (real patches with their own crops: 1.13). The region square is
  the largest square inside the region, nearest its centroid, chosen without looking at the
  crop; ``outside`` repeats the measure with the crop's own box cut out of the region, so that
  copying the crop into place does not count, only carrying its appearance across the region;
  ``in place`` compares the crop with the synthesised pixels of its own box (is it drawn
  where it was given?). The same measures on the real test patches with their own crops (the
  ``real`` row) show what real tissue gives.

Both are computed for every variant (the held-out maps and crops of a synthetic store are the
same for all variants), so the variants that ignore crops give the ratio's null level.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histopipe import __version__
from histopipe.errors import HistopipeError
from histopipe.evaluation.features import FeatureEncoder, ImageSet, open_store
from histopipe.evaluation.segmentation import Segmenter, load_segmenter, segmentation_scores
from histopipe.evaluation.settings import EvaluationSettings, resolve_device
from histopipe.regions import square_fits

log = logging.getLogger(__name__)


def label_fidelity(seg: Segmenter, images: np.ndarray, maps: np.ndarray, device: torch.device, batch_size: int = 32) -> dict:
    """Segmenter predictions on uint8 images (N, H, W, 3) scored against maps (N, H, W):
    ``miou``, ``mdice``, ``pixel_accuracy``, per-class scores and the confusion matrix."""
    if len(images) == 0:
        return {"miou": None, "pixel_accuracy": None, "reason": "no images"}
    if int(np.max(maps)) >= seg.num_classes:
        raise HistopipeError(f"maps reach label {int(np.max(maps))}; the segmenter knows {seg.num_classes} labels")
    conf = seg.confusion(images, maps, device, batch_size)
    scores = segmentation_scores(conf, seg.ignore_background, seg.label_names or None)
    return {**scores, "confusion": conf.tolist(), "n_images": int(len(images))}


def nearest_square(mask: np.ndarray, min_side: int) -> tuple[int, int, int] | None:
    """(y0, x0, side) of the largest square inside ``mask`` whose centre is nearest the mask's
    centroid, or None when no square of ``min_side`` px fits."""
    if not mask.any():
        return None
    lo, hi = 0, min(mask.shape)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if square_fits(mask, mid).any():
            lo = mid
        else:
            hi = mid - 1
    if lo < min_side:
        return None
    ys, xs = np.nonzero(square_fits(mask, lo))
    cy, cx = (np.mean(a) for a in np.nonzero(mask))
    d = (ys + lo / 2 - 0.5 - cy) ** 2 + (xs + lo / 2 - 0.5 - cx) ** 2
    j = int(np.argmin(d))
    return int(ys[j]), int(xs[j]), lo


@dataclass
class CropPair:
    """One conditioning crop, a random crop of its type, and squares of its synthesised region:
    nearest the region's centroid (``region``), outside the crop's box (``outside``) and the
    crop's own box (``in_place``)."""

    crop: np.ndarray
    random: np.ndarray
    region: np.ndarray
    outside: np.ndarray | None
    in_place: np.ndarray


class BankByType:
    """Crop-bank crops (uint8, bank size) by tissue label, with their slide ids."""

    def __init__(self, path: str | Path, lut: np.ndarray | None = None):
        from histopipe.cropbank import CropBank
        from histopipe.dataset import read_strings

        self.bank = CropBank(path)
        labels = np.asarray(self.bank.labels, dtype=np.int64)
        self.labels = lut[labels] if lut is not None else labels
        self.slides = np.asarray(read_strings(self.bank._root["slide_id"]), dtype=object)

    def draw(self, label: int, not_slide: str, rng: np.random.Generator) -> np.ndarray | None:
        rows = np.flatnonzero((self.labels == label) & (self.slides != not_slide))
        if rows.size == 0:
            return None
        return self.bank[int(rows[rng.integers(rows.size)])]


def _square(image: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    y0, x0, side = box
    return image[y0 : y0 + side, x0 : x0 + side]


def crop_pairs(
    store, bank: BankByType, min_side: int, seed: int, source: str = "store",
    rows: np.ndarray | None = None, max_pairs: int | None = None,
) -> tuple[list[CropPair], dict[str, int]]:
    """The crop pairs of a store's ``rows`` (default all): a synthetic store (the crops are in
    ``crop_canvas``) or a patch store (the crops are the image's own pixels at the boxes: the
    reference real tissue gives). At most ``max_pairs`` pairs, a seeded random choice; counts
    of crops skipped by reason."""
    from histopipe.dataset import read_strings

    for name in ("crop_boxes", "crop_labels", "crop_valid", "maps", "images"):
        if name not in store:
            raise HistopipeError(f"{source}: no `{name}` array (not a synthetic or patch store)")
    valid = np.asarray(store["crop_valid"][:])
    boxes = np.asarray(store["crop_boxes"][:])
    labels = np.asarray(store["crop_labels"][:])
    slides = read_strings(store["slide_id"]) if "slide_id" in store else np.array([""] * len(valid), dtype=object)
    rows = np.arange(len(valid)) if rows is None else np.asarray(rows)
    slots = [(int(i), int(k)) for i in rows for k in np.flatnonzero(valid[i])]
    rng = np.random.default_rng(seed)
    if max_pairs is not None and len(slots) > max_pairs:
        slots = [slots[j] for j in np.sort(rng.choice(len(slots), max_pairs, replace=False))]
    has_canvas = "crop_canvas" in store
    pairs: list[CropPair] = []
    skipped = {"small_region": 0, "no_random_crop": 0}
    current, image, label_map, canvas = -1, None, None, None
    for i, k in slots:
        if i != current:  # slots are grouped by row: each row is read once
            current = i
            image = np.asarray(store["images"][i])
            label_map = np.asarray(store["maps"][i])
            canvas = np.asarray(store["crop_canvas"][i]) if has_canvas else image
        y0, x0, side = (int(v) for v in boxes[i, k])
        label = int(labels[i, k])
        region = label_map == label
        sq = nearest_square(region, min_side)
        if sq is None:
            skipped["small_region"] += 1
            continue
        random = bank.draw(label, str(slides[i]), rng)
        if random is None:
            skipped["no_random_crop"] += 1
            continue
        outside_mask = region.copy()
        outside_mask[y0 : y0 + side, x0 : x0 + side] = False
        osq = nearest_square(outside_mask, min_side)
        box = (y0, x0, side)
        pairs.append(CropPair(_square(canvas, box), random, _square(image, sq), None if osq is None else _square(image, osq),
                              _square(image, box)))
    return pairs, skipped


FEATURES = ("appearance", "pooled")


def _features(encoder: FeatureEncoder, images: list[np.ndarray], features: str, stages: int, batch: int = 64) -> torch.Tensor:
    """Unit-length features (N, D) of uint8 images of any sizes (the encoder resizes them):
    the encoder's appearance statistics or its pooled output."""
    out = []
    for i in range(0, len(images), batch):
        chunk = list(images[i : i + batch])
        out.append(encoder.appearance(chunk, stages) if features == "appearance" else encoder.embed(chunk))
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)


def _compare(features: str, crop: torch.Tensor, random: torch.Tensor, target: torch.Tensor) -> dict:
    """Own crop against random crop of the type, as seen from ``target`` (the synthesised
    squares): ``ratio`` (above 1: nearer the own crop), ``win`` (fraction of pairs whose target
    is nearer its own crop) and the two mean statistics. Pooled features compare by cosine
    similarity (own / random), appearance statistics by distance (random / own), so that a
    ratio near 1 always means the crop made no difference."""
    if features == "pooled":
        own, rnd = (crop * target).sum(1), (random * target).sum(1)
        nearer, ratio = own > rnd, own.mean() / rnd.mean()
    else:
        own, rnd = (crop - target).norm(dim=1), (random - target).norm(dim=1)
        nearer, ratio = own < rnd, rnd.mean() / own.mean()
    out = {"ratio": float(ratio), "win": float(nearer.float().mean()), "own": float(own.mean()), "random": float(rnd.mean())}
    if features == "appearance" and out["own"] == 0:
        out.update(ratio=None, reason="the squares are their crops' own pixels (distance 0)")
    elif features == "pooled" and not out["random"] > 0:
        out.update(ratio=None, reason=f"mean cosine similarity to the random crops is {out['random']:.3g}, not positive: "
                                      "a ratio of similarities means nothing")
    elif not math.isfinite(out["ratio"]):
        out.update(ratio=None, reason="the features are not finite")
    return out


def crop_fidelity(
    encoder: FeatureEncoder, pairs: list[CropPair], skipped: dict[str, int], features: str = "appearance", stages: int = 3,
) -> dict:
    """Crop fidelity of ``pairs``: how much nearer each synthesised region square lies to its
    own crop than to a random crop of its type, in the encoder's ``features`` (``appearance``:
    channel statistics of its first ``stages`` stages, compared by distance; ``pooled``: its
    output, compared by cosine similarity). ``ratio`` for the region square, ``ratio_outside``
    for the square outside the crop's box, ``ratio_in_place`` for the crop's own box, each with
    its ``win`` rate; None with a reason when nothing counts. Each image is embedded once."""
    if features not in FEATURES:
        raise HistopipeError(f"crop fidelity features {features!r}: choose one of {', '.join(FEATURES)}")
    if features == "appearance" and not hasattr(encoder, "appearance"):
        raise HistopipeError(f"encoder {type(encoder).__name__} has no appearance statistics; use pooled features")
    out: dict = {"features": features, "stages": stages if features == "appearance" else None,
                 "statistic": "distance" if features == "appearance" else "cosine similarity",
                 "n_pairs": len(pairs), "skipped": skipped}
    if not pairs:
        out.update(ratio=None, ratio_outside=None, ratio_in_place=None,
                   reason="no conditioning crop had a region square and a same-type crop from another slide")
        return out

    def embed(images: list[np.ndarray]) -> torch.Tensor:
        return _features(encoder, images, features, stages)

    crop, random = embed([p.crop for p in pairs]), embed([p.random for p in pairs])
    out.update(_compare(features, crop, random, embed([p.region for p in pairs])))
    in_place = _compare(features, crop, random, embed([p.in_place for p in pairs]))
    out.update(ratio_in_place=in_place["ratio"], win_in_place=in_place["win"])
    if "reason" in in_place:  # e.g. real patches: their crops are cut from these very pixels
        out["reason_in_place"] = in_place["reason"]
    keep = [i for i, p in enumerate(pairs) if p.outside is not None]
    out["n_pairs_outside"] = len(keep)
    if keep:
        outside = _compare(features, crop[keep], random[keep], embed([pairs[i].outside for i in keep]))
        out.update(ratio_outside=outside["ratio"], win_outside=outside["win"],
                   own_outside=outside["own"], random_outside=outside["random"])
        if "reason" in outside:
            out["reason_outside"] = outside["reason"]
    else:
        out.update(ratio_outside=None, reason_outside="no region left a square outside its crop's box")
    return out


def evaluate_fidelity(
    synthetic_path: str | Path | None,
    real_path: str | Path,
    segmenter_path: str | Path,
    bank_path: str | Path,
    settings: EvaluationSettings,
    variant: str | None = None,
    encoder_factory=None,
) -> dict:
    """Label and crop fidelity of a synthetic store, or with ``synthetic_path`` None of the
    real ``settings.real_split`` patches with their own crops (the reference: label fidelity's
    upper bound and what real tissue gives for crop fidelity). What ``evaluate-fidelity`` writes."""
    from histopipe.evaluation.distribution import registry_factory

    t0 = time.perf_counter()
    device = resolve_device(settings.device)
    if synthetic_path is None:
        images_set = ImageSet.open(real_path, split=settings.real_split)
        variant, level, rows = "real", 0, images_set.indices
    else:
        images_set = ImageSet.open(synthetic_path, split="all")
        variant = variant or str(images_set.attrs.get("variant", Path(synthetic_path).stem))
        level, rows = int(images_set.attrs.get("level", 0) or 0), None
    store = open_store(images_set.path)
    seg = load_segmenter(segmenter_path, device)
    result: dict = {"kind": "fidelity", "variant": variant, "images": images_set.describe(), "segmenter": str(segmenter_path),
                    "seed": settings.seed, "histopipe_version": __version__}
    if level:
        result["label"] = {"miou": None, "pixel_accuracy": None,
                           "reason": f"maps at level {level}; the segmenter predicts the finest level"}
    else:
        images, maps = images_set.read(images_set.indices, maps=True)
        result["label"] = label_fidelity(seg, images, maps, device, settings.batch_size)
    real = open_store(real_path)
    lut = np.asarray(real["level_luts"][:])[level] if level else None
    name = settings.fidelity_encoder
    encoder = (encoder_factory or registry_factory)(name, weights=settings.encoder_weights.get(name), device=str(device))
    pairs, skipped = crop_pairs(store, BankByType(bank_path, lut), settings.fidelity_min_side, settings.seed,
                                str(images_set.path), rows, settings.fidelity_max_pairs)
    result["crop"] = {"encoder": name, **crop_fidelity(encoder, pairs, skipped, settings.fidelity_features,
                                                        settings.fidelity_stages)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    lab, crop = result["label"], result["crop"]
    log.info("%s: label fidelity mIoU %s, crop fidelity ratio %s (outside the box %s, in place %s)", variant,
             lab.get("miou"), crop.get("ratio"), crop.get("ratio_outside"), crop.get("ratio_in_place"))
    return result
