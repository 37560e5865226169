"""Episode augmentations as pure functions of (image, mask, rng).

All functions take 2-D float32 slices [H, W] (intensities in any range, e.g. z-scored) and binary masks
[H, W], and an explicit ``numpy.random.Generator``; they never touch global random state. Geometric
transforms build one sampling map (affine composed with the elastic displacement) and warp image and mask
with it through ``cv2.remap`` (bilinear, reflected borders; the mask is warped as float and rounded at 0.5).

Defaults follow DESIGN.md section 3 (SSL-ALPNet / ADNet): gamma ~ U(0.5, 1.5) on the slice's min-max range;
affine rotation +-5 deg, shift +-5 px, shear +-5 deg, isotropic scale U(0.9, 1.2); elastic alpha 10,
sigma 5 (pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "AugmentParams",
    "gamma_transform",
    "random_affine_matrix",
    "elastic_displacement",
    "geometric_transform",
    "augment_pair",
]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the episode augmentation (angles in degrees, shifts and sigma in pixels)."""

    gamma_range: tuple = (0.5, 1.5)
    rotation_deg: float = 5.0
    shift_px: float = 5.0
    shear_deg: float = 5.0
    scale_range: tuple = (0.9, 1.2)
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0


def gamma_transform(image: np.ndarray, rng: np.random.Generator, gamma_range: tuple = (0.5, 1.5)) -> np.ndarray:
    """Random gamma on the slice's min-max range.

    Args:
        image: float [H, W].
        rng: Random generator (one uniform draw).
        gamma_range: (low, high) of the uniform gamma.

    Returns:
        float32 [H, W]: ``((I - min) / (max - min)) ** gamma * (max - min) + min`` (unchanged when constant).
    """
    gamma = rng.uniform(*gamma_range)
    img = np.asarray(image, dtype=np.float32)
    lo = float(img.min())
    rng_ = float(img.max()) - lo
    if rng_ <= 0:
        return img.copy()
    out = (img - lo) * np.float32(1.0 / rng_)
    np.power(out, np.float32(gamma), out=out)
    out *= np.float32(rng_)
    out += np.float32(lo)
    return out


def random_affine_matrix(
    rng: np.random.Generator,
    shape: tuple,
    rotation_deg: float = 5.0,
    shift_px: float = 5.0,
    shear_deg: float = 5.0,
    scale_range: tuple = (0.9, 1.2),
) -> np.ndarray:
    """Random forward affine about the slice centre.

    Args:
        rng: Random generator (5 uniform draws: rotation, shift x, shift y, shear, scale).
        shape: (H, W) of the slice.

    Returns:
        float64 [2, 3] matrix mapping input (x, y) pixel coordinates to output coordinates.
    """
    h, w = shape
    rot = math.radians(rng.uniform(-rotation_deg, rotation_deg))
    tx, ty = rng.uniform(-shift_px, shift_px, size=2)
    shear = math.radians(rng.uniform(-shear_deg, shear_deg))
    scale = rng.uniform(*scale_range)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot_m = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    shear_m = np.array([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
    lin = scale * rot_m @ shear_m
    centre = np.array([cx, cy])
    offset = centre - lin @ centre + np.array([tx, ty])
    return np.hstack([lin, offset[:, None]])


def elastic_displacement(
    rng: np.random.Generator, shape: tuple, alpha: float = 10.0, sigma: float = 5.0
) -> tuple:
    """Random smooth displacement field (Simard et al.): U(-1, 1) noise, Gaussian-smoothed, times alpha.

    Returns:
        (dx, dy), each float32 [H, W] in pixels.
    """
    h, w = shape
    noise = rng.random((2, h, w), dtype=np.float32) * 2.0 - 1.0
    dx = cv2.GaussianBlur(noise[0], (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101) * np.float32(alpha)
    dy = cv2.GaussianBlur(noise[1], (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101) * np.float32(alpha)
    return dx, dy


def geometric_transform(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    params: AugmentParams = AugmentParams(),
) -> tuple:
    """Random affine followed by elastic deformation, applied identically to image and mask.

    The output pixel p samples the input at ``A^-1 (p + d(p))`` (affine then elastic, one interpolation).

    Args:
        image: float [H, W].
        mask: binary [H, W] (any numeric dtype).
        rng: Random generator.
        params: Augmentation ranges.

    Returns:
        (image float32 [H, W], mask float32 [H, W] in {0, 1}).
    """
    h, w = image.shape
    fwd = random_affine_matrix(
        rng, (h, w), params.rotation_deg, params.shift_px, params.shear_deg, params.scale_range
    )
    inv = cv2.invertAffineTransform(fwd)
    dx, dy = elastic_displacement(rng, (h, w), params.elastic_alpha, params.elastic_sigma)
    xs = np.arange(w, dtype=np.float32)[None, :] + dx
    ys = np.arange(h, dtype=np.float32)[:, None] + dy
    map_x = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]).astype(np.float32)
    map_y = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]).astype(np.float32)
    out_img = cv2.remap(
        np.asarray(image, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    out_mask = cv2.remap(
        np.asarray(mask, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    out_mask = (out_mask >= 0.5).astype(np.float32)
    return out_img, out_mask


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    params: AugmentParams = AugmentParams(),
) -> tuple:
    """The episode augmentation: gamma, then (independently drawn) affine + elastic.

    Returns:
        (image float32 [H, W], mask float32 [H, W] in {0, 1}).
    """
    img = gamma_transform(image, rng, params.gamma_range)
    return geometric_transform(img, mask, rng, params)
