"""PNG overlays of predictions for a quick visual check."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

GT_COLOUR = (0, 200, 0)  # BGR green
PRED_COLOUR = (0, 0, 255)  # BGR red


def overlay_contours(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Draw ground-truth (green) and predicted (red) contours on a grey-scale slice.

    Args:
        image: [H, W] intensities, any range (min-max scaled for display).
        ground_truth: [H, W] binary mask.
        prediction: [H, W] binary mask.

    Returns:
        [H, W, 3] uint8 BGR picture.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    grey = np.zeros(image.shape, np.uint8) if hi <= lo else ((image - lo) / (hi - lo) * 255).astype(np.uint8)
    canvas = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    for mask, colour in ((ground_truth, GT_COLOUR), (prediction, PRED_COLOUR)):
        contours, _ = cv2.findContours(np.asarray(mask).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, 1)
    return canvas


def save_overlay(path: str | os.PathLike, image: np.ndarray, ground_truth: np.ndarray,
                 prediction: np.ndarray, scale: int = 2) -> Path:
    """Write :func:`overlay_contours` as a PNG, enlarged ``scale`` times (nearest neighbour)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = overlay_contours(image, ground_truth, prediction)
    if scale > 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if not cv2.imwrite(str(path), picture):
        raise OSError(f"could not write overlay {path}")
    return path
