"""Overlap metrics for binary segmentations.

All functions are pure. Counts come from :func:`confusion_counts`. Empty cases follow MONAI and nnU-Net:
empty ground truth with an empty prediction is undefined (NaN, left out of means taken with ``np.nanmean``),
and any other zero denominator scores 0 (e.g. Dice 0 for a prediction on an empty ground truth).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Counts(NamedTuple):
    """Voxel counts of a binary prediction against a binary ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion_counts(pred: np.ndarray, target: np.ndarray) -> Counts:
    """Count true/false positives and negatives.

    Args:
        pred: binary prediction, any shape (non-zero = foreground).
        target: binary ground truth, same shape as ``pred``.

    Returns:
        The four voxel counts.
    """
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground truth shape {target.shape}")
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    tn = int(pred.size - tp - fp - fn)
    return Counts(tp, fp, fn, tn)


def _ratio(numerator: float, denominator: float, counts: Counts) -> float:
    if denominator > 0:
        return float(numerator) / float(denominator)
    return math.nan if counts.tp + counts.fp + counts.fn == 0 else 0.0


def dice(counts: Counts) -> float:
    """Dice = 2TP / (2TP + FP + FN)."""
    return _ratio(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn, counts)


def iou(counts: Counts) -> float:
    """Jaccard index = TP / (TP + FP + FN)."""
    return _ratio(counts.tp, counts.tp + counts.fp + counts.fn, counts)


def precision(counts: Counts) -> float:
    """Precision = TP / (TP + FP)."""
    return _ratio(counts.tp, counts.tp + counts.fp, counts)


def recall(counts: Counts) -> float:
    """Recall (sensitivity) = TP / (TP + FN)."""
    return _ratio(counts.tp, counts.tp + counts.fn, counts)


def segmentation_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of one binary prediction (e.g. one 3-D query volume).

    Args:
        pred: binary prediction, e.g. [Z, H, W].
        target: binary ground truth of the same shape.

    Returns:
        ``{"dice", "iou", "precision", "recall"}`` as floats in [0, 1]; all NaN when both masks are empty.
    """
    counts = confusion_counts(pred, target)
    return {
        "dice": dice(counts),
        "iou": iou(counts),
        "precision": precision(counts),
        "recall": recall(counts),
    }
