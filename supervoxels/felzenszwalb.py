"""Deterministic 3-D Felzenszwalb supervoxels (docs/protocol.md, "Supervoxels").

The algorithm is the 3-D extension of Felzenszwalb & Huttenlocher's graph segmentation used by ADNet,
Q-Net and DMAP to make self-supervision pseudo-labels:

* graph: the 26-connected voxel grid, each edge once (13 forward offsets, :data:`FORWARD_OFFSETS`);
* weight of the edge (a, b) along offset k: ``sqrt(w_k) * |I_a - I_b|`` in float32 with
  ``s = spacing_z / spacing_xy`` and ``w_k`` = 1 in-plane (diagonals included), ``s**2`` for a pure z
  step, ``(1 + s**2) / 2`` for z plus one in-plane step, ``(2 + s**2) / 3`` for z plus two in-plane
  steps (see :func:`edge_factors`);
* pass 1: edges in ascending weight; components a, b merge when
  ``w < min(Int(a) + k / |a|, Int(b) + k / |b|)`` with ``k = scale / 255``; ``Int`` of the merged
  component is ``w``;
* pass 2: one more pass over the sorted edges merges any pair where either side has fewer than
  ``min_size`` voxels;
* labels 0..N-1, numbered by first appearance in raster (C) order.

Determinism: ties in weight are broken by ascending edge id ``13 * v + k`` (``v`` the raster index of
the edge's first voxel, ``k`` the offset's position in :data:`FORWARD_OFFSETS`), all arithmetic is IEEE
float32/float64 without platform-dependent steps, so the same input gives the same labels on every
machine and numpy version.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from supervoxels import _felzenszwalb3d

#: The 13 forward neighbour offsets (dz, dy, dx) in lexicographic order; edge id = 13 * voxel + index.
FORWARD_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    (dz, dy, dx)
    for dz in (0, 1)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dz, dy, dx) > (0, 0, 0)
)

#: Largest number of voxels the engine accepts (edge ids are uint32).
MAX_VOXELS = (1 << 32) // len(FORWARD_OFFSETS) - 1


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Validate a (z, y, x) spacing in mm and return it as three Python floats."""
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def edge_factors(spacing: Sequence[float]) -> np.ndarray:
    """Per-offset weight factors ``sqrt(w_k)`` for the anisotropic grid.

    ``s = spacing_z / spacing_xy`` with ``spacing_xy`` the mean of the y and x spacings (they are equal
    for the data sets of this project). The w_k are computed in float64 and their square roots rounded to
    float32 once.

    Args:
        spacing: voxel spacing (z, y, x) in mm, all positive.

    Returns:
        float32 [13], the factor for each offset of :data:`FORWARD_OFFSETS`.
    """
    sz, sy, sx = _check_spacing(spacing)
    s = sz / ((sy + sx) / 2.0)
    s2 = s * s
    out = np.empty(len(FORWARD_OFFSETS), dtype=np.float32)
    for k, (dz, dy, dx) in enumerate(FORWARD_OFFSETS):
        n_inplane = abs(dy) + abs(dx)
        if dz == 0:
            w = 1.0
        elif n_inplane == 0:
            w = s2
        elif n_inplane == 1:
            w = (1.0 + s2) / 2.0
        else:
            w = (2.0 + s2) / 3.0
        out[k] = np.float32(math.sqrt(w))
    return out


def felzenszwalb_3d(
    volume: np.ndarray,
    spacing: Sequence[float],
    scale: float = 1.0,
    min_size: int = 5000,
    sigma: float = 0.0,
) -> np.ndarray:
    """Segment a 3-D volume into supervoxels with Felzenszwalb's graph algorithm.

    The engine does not rescale intensities: callers that follow the DMAP protocol pass the volume
    rescaled to [0, 255] (see :func:`supervoxels.generate_supervoxels.supervoxelize_volume`).

    Args:
        volume: real array [Z, H, W] (slices along axis 0), finite; converted to float32.
        spacing: voxel spacing (z, y, x) in mm, three positive numbers.
        scale: Felzenszwalb scale (>= 0); the merge constant is ``k = scale / 255`` (intensity units).
        min_size: minimum supervoxel size in voxels (>= 1); smaller components are merged in pass 2.
        sigma: standard deviation of an optional Gaussian pre-smoothing in mm (>= 0; 0 = none); the
            per-axis sigma in voxels is ``sigma / spacing``.

    Returns:
        int32 [Z, H, W] labels 0..N-1, each a 26-connected set of voxels, numbered by first appearance in
        raster order.

    Raises:
        ValueError: if the volume is not a non-empty finite real 3-D array (or too large), the spacing
            is not three positive numbers, ``scale``/``sigma`` are negative or not finite, or
            ``min_size`` is not an integer >= 1.
    """
    if not isinstance(volume, np.ndarray):
        volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be a 3-D array [Z, H, W], got shape {volume.shape}")
    if volume.size == 0:
        raise ValueError(f"volume must not be empty, got shape {volume.shape}")
    if volume.size > MAX_VOXELS:
        raise ValueError(f"volume has {volume.size} voxels; at most {MAX_VOXELS} are supported")
    if volume.dtype == np.bool_ or not (
        np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
    ):
        raise ValueError(f"volume must have a real numeric dtype, got {volume.dtype}")
    spacing = _check_spacing(spacing)
    if isinstance(min_size, (bool, np.bool_)) or not isinstance(min_size, numbers.Integral) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) or not (
        math.isfinite(scale) and scale >= 0
    ):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, numbers.Real) or not (
        math.isfinite(sigma) and sigma >= 0
    ):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        raise ValueError("volume contains NaN or infinite values")

    if sigma > 0:
        from scipy import ndimage

        sigmas = [sigma / sp for sp in spacing]
        vol32 = ndimage.gaussian_filter(volume.astype(np.float64), sigma=sigmas).astype(np.float32)
    else:
        with np.errstate(over="ignore"):
            vol32 = np.ascontiguousarray(volume, dtype=np.float32)
    if vol32.dtype != volume.dtype and not np.isfinite(vol32).all():
        raise ValueError("volume values exceed the float32 range")

    labels, _, _ = _felzenszwalb3d.segment(vol32, edge_factors(spacing), float(scale), int(min_size))
    return labels
