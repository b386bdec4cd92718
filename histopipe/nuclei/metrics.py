"""Nuclei segmentation and classification scores, accumulated over a whole test set.

Definitions (as in HoVer-Net, PanNuke and CoNIC):

- **Matching**: a true and a predicted nucleus are paired when their IoU is > 0.5. Nuclei of
  one map do not overlap, so each nucleus has at most one partner with IoU > 0.5 and the
  pairing is unique without any assignment step (Kirillov et al., PQ).
- **Dice** (binary): 2 |T ∩ P| / (|T| + |P|) of the foreground (instance id > 0) pixels.
- **AJI** (Kumar et al. 2017): each true nucleus G is paired with the predicted nucleus S of
  largest IoU among those it overlaps; AJI = Σ |G ∩ S| / (Σ |G ∪ S| + Σ |S unused|), where a
  true nucleus with no overlap adds |G| to the union and every predicted nucleus chosen by
  no true nucleus adds its area to the union.
- **PQ** = DQ × SQ with DQ = TP / (TP + FP/2 + FN/2) (the detection F1, F_d) and SQ the mean
  IoU of the matched pairs.
- **F_c** per class c (HoVer-Net): over the matched pairs, TP_c/TN_c count pairs whose true
  and predicted class are both / neither c, FP_c pairs predicted c but truly not, FN_c pairs
  truly c but predicted otherwise; FP_d,c / FN_d,c count unmatched predicted / true nuclei of
  class c. F_c = 2(TP_c + TN_c) / (2(TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c).
- **Accuracy**: the share of matched pairs whose predicted class is the true one.

Every score is aggregated over the test set (sums of counts, areas and IoUs over all images,
divided at the end), so a test set is streamed image by image; AJI and PQ are thus the
dataset-level forms (as CoNIC's PQ+), not means of per-image scores. A score whose
denominator is zero (nothing true and nothing predicted) is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histopipe.errors import HistopipeError
from histopipe.nuclei.labels import instance_classes

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class Overlaps:
    """Pairwise overlaps of the nuclei of a true and a predicted instance map.

    ``true_ids`` (T,) and ``pred_ids`` (P,) are the instance ids present (background left
    out); ``intersection`` int64 (T, P) and ``union`` int64 (T, P) are pixel counts;
    ``true_area`` (T,) and ``pred_area`` (P,) the nuclei's areas in pixels.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        """float64 (T, P); 0 where the union is empty (cannot happen for present ids)."""
        return self.intersection / np.maximum(self.union, 1)


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Intersections and unions of every true/predicted nucleus pair, from one joint histogram
    of the two maps (int arrays (H, W), 0 = background), so the cost is one pass over pixels."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 2:
        raise HistopipeError(f"instance maps must be 2-D of one shape, got {true.shape} and {pred.shape}")
    # Dense relabelling (0 stays first because it is the smallest id) keeps the histogram small.
    t_ids, t_idx = np.unique(true, return_inverse=True)
    p_ids, p_idx = np.unique(pred, return_inverse=True)
    nt, np_ = len(t_ids), len(p_ids)
    joint = np.bincount(t_idx.ravel() * np_ + p_idx.ravel(), minlength=nt * np_).reshape(nt, np_)
    t_area = joint.sum(axis=1)
    p_area = joint.sum(axis=0)
    # Drop the background row/column (if present: a map may be all nuclei or all background).
    t_keep = t_ids != 0
    p_keep = p_ids != 0
    inter = joint[t_keep][:, p_keep].astype(np.int64)
    ta, pa = t_area[t_keep].astype(np.int64), p_area[p_keep].astype(np.int64)
    union = ta[:, None] + pa[None, :] - inter
    return Overlaps(t_ids[t_keep], p_ids[p_keep], inter, union, ta, pa)


@dataclass(frozen=True)
class Matching:
    """Unique IoU > 0.5 pairs: ``pairs`` int (K, 2) of (true id, predicted id), ``iou`` (K,),
    and the ids left unmatched on either side."""

    pairs: np.ndarray
    iou: np.ndarray
    unmatched_true: np.ndarray
    unmatched_pred: np.ndarray


def match_instances(true: np.ndarray, pred: np.ndarray, ov: Overlaps | None = None) -> Matching:
    """Pair true and predicted nuclei with IoU > 0.5 (unique, see the module docstring)."""
    ov = ov if ov is not None else overlaps(true, pred)
    ti, pi = np.nonzero(ov.iou > IOU_THRESHOLD)
    pairs = np.stack([ov.true_ids[ti], ov.pred_ids[pi]], axis=1) if len(ti) else np.zeros((0, 2), np.int64)
    return Matching(
        pairs=pairs.astype(np.int64),
        iou=ov.iou[ti, pi].astype(np.float64),
        unmatched_true=np.setdiff1d(ov.true_ids, ov.true_ids[ti]),
        unmatched_pred=np.setdiff1d(ov.pred_ids, ov.pred_ids[pi]),
    )


def aji_terms(ov: Overlaps) -> tuple[int, int]:
    """(aggregated intersection, aggregated union) of one image for AJI (Kumar et al.)."""
    if len(ov.true_ids) == 0:
        return 0, int(ov.pred_area.sum())
    inter_sum = 0
    union_sum = 0
    used = np.zeros(len(ov.pred_ids), dtype=bool)
    iou = ov.iou
    for g in range(len(ov.true_ids)):
        if len(ov.pred_ids) == 0 or ov.intersection[g].max() == 0:
            union_sum += int(ov.true_area[g])
            continue
        s = int(np.argmax(iou[g]))
        inter_sum += int(ov.intersection[g, s])
        union_sum += int(ov.union[g, s])
        used[s] = True
    # Predicted nuclei that no true nucleus chose are pure false positive area.
    union_sum += int(ov.pred_area[~used].sum())
    return inter_sum, union_sum


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


@dataclass
class NucleiScores:
    """Accumulator of every score above over many images; ``num_classes`` counts background
    (class ids 1 .. num_classes - 1 are scored)."""

    num_classes: int
    images: int = 0
    dice_inter: int = 0
    dice_sum: int = 0
    aji_inter: int = 0
    aji_union: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0
    # (true class, predicted class) counts over matched pairs, and unmatched nuclei per class.
    pair_confusion: np.ndarray = field(init=False)
    fn_unmatched: np.ndarray = field(init=False)
    fp_unmatched: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.num_classes < 2:
            raise HistopipeError(f"num_classes must count background and >= 1 class, got {self.num_classes}")
        c = self.num_classes
        self.pair_confusion = np.zeros((c, c), np.int64)
        self.fn_unmatched = np.zeros(c, np.int64)
        self.fp_unmatched = np.zeros(c, np.int64)

    def update(
        self,
        true: np.ndarray,
        true_classes: dict[int, int],
        pred: np.ndarray,
        pred_classes: dict[int, int],
    ) -> None:
        """Add one image: instance maps int (H, W) (0 = background) and the class of each
        instance id (ids missing from a dict count as class 0, i.e. unclassified)."""
        true = np.asarray(true)
        pred = np.asarray(pred)
        ov = overlaps(true, pred)
        m = match_instances(true, pred, ov)
        t_fg, p_fg = true > 0, pred > 0
        self.images += 1
        self.dice_inter += int((t_fg & p_fg).sum())
        self.dice_sum += int(t_fg.sum() + p_fg.sum())
        inter, union = aji_terms(ov)
        self.aji_inter += inter
        self.aji_union += union
        self.tp += len(m.pairs)
        self.fp += len(m.unmatched_pred)
        self.fn += len(m.unmatched_true)
        self.iou_sum += float(m.iou.sum())
        for t_id, p_id in m.pairs:
            self.pair_confusion[self._cls(true_classes, t_id), self._cls(pred_classes, p_id)] += 1
        for t_id in m.unmatched_true:
            self.fn_unmatched[self._cls(true_classes, t_id)] += 1
        for p_id in m.unmatched_pred:
            self.fp_unmatched[self._cls(pred_classes, p_id)] += 1

    def _cls(self, classes: dict[int, int], i) -> int:
        k = int(classes.get(int(i), 0))
        if not 0 <= k < self.num_classes:
            raise HistopipeError(f"nucleus {int(i)} has class {k}, outside 0..{self.num_classes - 1}")
        return k

    def class_f1(self) -> np.ndarray:
        """HoVer-Net F_c for classes 1 .. C-1, float64 (C-1,); NaN where undefined."""
        conf = self.pair_confusion
        matched = conf.sum()
        out = []
        for k in range(1, self.num_classes):
            tp_c = conf[k, k]
            fp_c = conf[:, k].sum() - tp_c
            fn_c = conf[k, :].sum() - tp_c
            tn_c = matched - tp_c - fp_c - fn_c
            good = 2 * (tp_c + tn_c)
            out.append(_ratio(good, good + 2 * fp_c + 2 * fn_c + self.fp_unmatched[k] + self.fn_unmatched[k]))
        return np.array(out, dtype=np.float64)

    def result(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """Scores and the counts behind them (JSON-ready; undefined scores are NaN)."""
        dq = _ratio(self.tp, self.tp + 0.5 * self.fp + 0.5 * self.fn)
        sq = _ratio(self.iou_sum, self.tp)
        names = list(class_names) if class_names else [str(k) for k in range(self.num_classes)]
        f1 = self.class_f1()
        support = self.pair_confusion.sum(axis=1) + self.fn_unmatched
        return {
            "n_images": self.images,
            "dice": _ratio(2 * self.dice_inter, self.dice_sum),
            "aji": _ratio(self.aji_inter, self.aji_union),
            "dq": dq,
            "sq": sq,
            "pq": dq * sq if self.tp else (0.0 if np.isfinite(dq) else float("nan")),
            "f1_detection": dq,
            "accuracy": _ratio(np.trace(self.pair_confusion), self.pair_confusion.sum()),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "per_class": {
                names[k]: {"class": k, "f1": float(f1[k - 1]), "n_true": int(support[k])}
                for k in range(1, self.num_classes)
            },
        }


def score_image(
    true: np.ndarray,
    true_semantic: np.ndarray,
    pred: np.ndarray,
    pred_semantic: np.ndarray,
    num_classes: int,
) -> dict:
    """All scores of one image pair, with instance classes taken from semantic maps."""
    acc = NucleiScores(num_classes)
    acc.update(true, instance_classes(true, true_semantic), pred, instance_classes(pred, pred_semantic))
    return acc.result()


@dataclass
class PointScores:
    """Do synthesised nuclei land on the requested points? Centroids of the nuclei found in
    the synthesised labels are matched one-to-one to the requested points (the assignment of
    least total distance among pairs at most ``radius`` px apart); detection F1 over all images
    and the share of matched nuclei that carry the requested class."""

    radius: float = 6.0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    class_correct: int = 0

    def update(self, requested: np.ndarray, found: np.ndarray) -> None:
        """Rows ``(y, x, class)`` of the requested points and of the found nuclei of one image."""
        from scipy.optimize import linear_sum_assignment

        requested = np.asarray(requested, dtype=np.float64).reshape(-1, 3)
        found = np.asarray(found, dtype=np.float64).reshape(-1, 3)
        matched = []
        if len(requested) and len(found):
            d = np.hypot(requested[:, None, 0] - found[None, :, 0], requested[:, None, 1] - found[None, :, 1])
            cost = np.where(d <= self.radius, d, 1e6)
            rows, cols = linear_sum_assignment(cost)
            matched = [(r, c) for r, c in zip(rows, cols, strict=True) if d[r, c] <= self.radius]
        self.tp += len(matched)
        self.fn += len(requested) - len(matched)
        self.fp += len(found) - len(matched)
        self.class_correct += sum(int(requested[r, 2] == found[c, 2]) for r, c in matched)

    def result(self) -> dict:
        return {
            "f1": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "class_accuracy": _ratio(self.class_correct, self.tp),
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "radius": self.radius,
        }
