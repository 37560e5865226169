"""PNG overlays of predictions for a quick visual check, oriented as a radiologist expects them.

Display convention (radiological, as ITK-SNAP shows volumes): axial slices with anterior up and the
patient's right on the picture's left; coronal slices with superior up, patient's right on the left;
sagittal slices with superior up, anterior on the left. The orientation comes from the volume's direction
matrix (SimpleITK / ITK, physical axes x -> patient's left, y -> posterior, z -> superior).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

GT_COLOUR = (0, 200, 0)  # BGR green
PRED_COLOUR = (0, 0, 255)  # BGR red


def radiological_view(slice_hw: np.ndarray, direction: Sequence[float]) -> np.ndarray:
    """Flip / transpose one slice of a volume for display in the radiological convention.

    Args:
        slice_hw: [H, W] (or [H, W, C]) slice ``volume[k]`` of a volume stored as [Z, H, W], i.e. rows
            along the image's second index axis (j) and columns along its first (i).
        direction: The volume's direction matrix, 9 values row-major (``SimpleITK.Image.GetDirection()``):
            column 0 is the physical direction of index i, column 1 of index j, column 2 of index k.

    Returns:
        A view of ``slice_hw`` whose rows run downwards towards posterior (axial planes) or inferior
        (coronal and sagittal planes) and whose columns run rightwards towards the patient's left
        (axial, coronal) or posterior (sagittal).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    normal = int(np.argmax(np.abs(d[:, 2])))
    p, q = [axis for axis in range(3) if axis != normal]
    # physical axis of the array's columns (index i) and rows (index j), by the better of the two pairings
    if abs(d[p, 0]) + abs(d[q, 1]) >= abs(d[q, 0]) + abs(d[p, 1]):
        col_axis, row_axis = p, q
    else:
        col_axis, row_axis = q, p
    col_sign, row_sign = np.sign(d[col_axis, 0]), np.sign(d[row_axis, 1])
    vertical = 2 if normal != 2 else 1  # superior-inferior when in plane, else anterior-posterior
    out = np.asarray(slice_hw)
    if row_axis != vertical:
        out = np.swapaxes(out, 0, 1)
        col_sign, row_sign = row_sign, col_sign
    # down = +y (posterior) for axial planes, -z (inferior) otherwise; right = +x (left) or +y (posterior)
    if row_sign != (1.0 if vertical == 1 else -1.0):
        out = out[::-1]
    if col_sign != 1.0:
        out = out[:, ::-1]
    return out


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
                 prediction: np.ndarray, scale: int = 2, direction: Optional[Sequence[float]] = None) -> Path:
    """Write :func:`overlay_contours` as a PNG, enlarged ``scale`` times (nearest neighbour).

    Args:
        path, image, ground_truth, prediction: as :func:`overlay_contours` (slices [H, W] of one volume).
        scale: Enlargement factor.
        direction: The volume's direction matrix (9 values); when given the picture is drawn in the
            radiological convention (:func:`radiological_view`), else in array order.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if direction is not None:
        image, ground_truth, prediction = (np.ascontiguousarray(radiological_view(a, direction))
                                           for a in (image, ground_truth, prediction))
    picture = overlay_contours(image, ground_truth, prediction)
    if scale > 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if not cv2.imwrite(str(path), picture):
        raise OSError(f"could not write overlay {path}")
    return path
