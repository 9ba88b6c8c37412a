"""The anomaly-detection field's metrics: AUROC and AP (scikit-learn), PRO, operating points.

Scores are "higher = more defective". A metric that needs both good and defective
examples is None when one kind is missing (e.g. a category without good images).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

PRO_MAX_FPR = 0.3
OPERATING_FPRS = (0.01, 0.05)


def _both_kinds(truth: np.ndarray) -> bool:
    return bool(truth.any()) and not bool(truth.all())


def auroc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` separating truth True from False."""
    truth = np.asarray(truth, dtype=bool).ravel()
    return float(roc_auc_score(truth, np.asarray(scores).ravel())) if _both_kinds(truth) else None


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision (area under precision-recall, step-wise) of `scores` for truth True."""
    truth = np.asarray(truth, dtype=bool).ravel()
    return float(average_precision_score(truth, np.asarray(scores).ravel())) if _both_kinds(truth) else None


def pro(masks: list[np.ndarray], maps: list[np.ndarray], max_fpr: float = PRO_MAX_FPR) -> float | None:
    """Per-region overlap integrated over FPR 0..max_fpr and divided by max_fpr (Bergmann et al.).

    Each connected ground-truth region (8-connectivity) weighs the same whatever its size:
    at a threshold t, PRO(t) is the mean over all regions of all images of the share of the
    region's pixels with score >= t, and FPR(t) the share of all defect-free pixels with
    score >= t. The curve is exact at every distinct score (pixels sorted once, per-pixel
    weights 1 / (|region| · #regions) and 1 / #defect-free summed), linearly interpolated
    at max_fpr and integrated with the trapezoid rule.
    """
    weights_pro, weights_fpr, scores = [], [], []
    regions = 0
    for mask, score in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        sizes = np.bincount(components.ravel(), minlength=count).astype(np.float64)
        per_pixel = np.where(mask, 1.0 / np.maximum(sizes[components], 1.0), 0.0)
        regions += count - 1
        weights_pro.append(per_pixel.ravel())
        weights_fpr.append((~mask).ravel())
        scores.append(np.asarray(score, dtype=np.float32).ravel())
    normal = float(sum(int(w.sum()) for w in weights_fpr))
    if regions == 0 or normal == 0:
        return None
    score = np.concatenate(scores)
    order = np.argsort(-score, kind="stable")
    pro_curve = np.cumsum(np.concatenate(weights_pro)[order]) / regions
    fpr_curve = np.cumsum(np.concatenate(weights_fpr)[order]) / normal
    sorted_scores = score[order]
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr_curve[last_of_tie]]
    overlap = np.r_[0.0, pro_curve[last_of_tie]]
    inside = fpr <= max_fpr
    fpr_in, pro_in = fpr[inside], overlap[inside]
    if fpr_in[-1] < max_fpr:
        after = int(np.argmax(fpr > max_fpr))
        share = (max_fpr - fpr[after - 1]) / (fpr[after] - fpr[after - 1])
        fpr_in = np.r_[fpr_in, max_fpr]
        pro_in = np.r_[pro_in, overlap[after - 1] + share * (overlap[after] - overlap[after - 1])]
    return float(np.trapezoid(pro_in, fpr_in) / max_fpr)


def operating_point(truth: np.ndarray, scores: np.ndarray, target_fpr: float) -> dict[str, float] | None:
    """The lowest threshold at which at most `target_fpr` of good images score above it (the
    daemon flags score > threshold), with the false-alarm rate and recall measured there."""
    truth = np.asarray(truth, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not _both_kinds(truth):
        return None
    good = np.sort(scores[~truth])[::-1]
    allowed = int(math.floor(target_fpr * good.size + 1e-9))
    threshold = float(good[min(allowed, good.size - 1)])
    return {"threshold": threshold,
            "fpr": float((good > threshold).mean()),
            "recall": float((scores[truth] > threshold).mean())}


def binary_miou(confusion: np.ndarray) -> float | None:
    """Mean IoU of background and defect from a 2×2 confusion (rows truth, columns prediction)."""
    ious = []
    for k in (0, 1):
        union = confusion[k, :].sum() + confusion[:, k].sum() - confusion[k, k]
        if union > 0:
            ious.append(confusion[k, k] / union)
    return float(np.mean(ious)) if ious else None
