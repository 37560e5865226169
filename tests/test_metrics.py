"""Overlap metrics on hand-computed cases."""
import numpy as np
import pytest

from util.metrics import Counts, confusion_counts, dice, iou, precision, recall, segmentation_scores


def test_counts_and_scores_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    target = np.array([[1, 0, 0], [1, 1, 0]])
    # TP: (0,0),(1,1) = 2; FP: (0,1) = 1; FN: (1,0) = 1; TN: 2
    counts = confusion_counts(pred, target)
    assert counts == Counts(tp=2, fp=1, fn=1, tn=2)
    assert dice(counts) == pytest.approx(4 / 6)
    assert iou(counts) == pytest.approx(2 / 4)
    assert precision(counts) == pytest.approx(2 / 3)
    assert recall(counts) == pytest.approx(2 / 3)


def test_three_dimensional_volume():
    target = np.zeros((2, 4, 4), bool)
    target[0, :2, :2] = True  # 4 voxels
    target[1, :2, :2] = True  # 4 voxels
    pred = np.zeros_like(target)
    pred[0, :2, :2] = True  # 4 TP in slice 0, 4 FN in slice 1
    pred[1, 3, 3] = True  # 1 FP
    scores = segmentation_scores(pred, target)
    assert scores["dice"] == pytest.approx(8 / (8 + 1 + 4))
    assert scores["iou"] == pytest.approx(4 / 9)
    assert scores["precision"] == pytest.approx(4 / 5)
    assert scores["recall"] == pytest.approx(4 / 8)


def test_empty_conventions():
    empty = np.zeros((3, 3))
    # MONAI / nnU-Net: nothing to find and nothing found is undefined, not a perfect score
    both_empty = segmentation_scores(empty, empty)
    assert set(both_empty) == {"dice", "iou", "precision", "recall"}
    assert all(np.isnan(v) for v in both_empty.values())
    full = np.ones((3, 3))
    missed = segmentation_scores(empty, full)
    assert missed["dice"] == 0.0 and missed["precision"] == 0.0 and missed["recall"] == 0.0
    spurious = segmentation_scores(full, empty)
    assert spurious["dice"] == 0.0 and spurious["recall"] == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        confusion_counts(np.zeros((2, 2)), np.zeros((3, 3)))
