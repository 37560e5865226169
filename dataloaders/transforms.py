"""Episode augmentations as pure functions of (image, mask, rng).

All functions take 2-D float32 slices [H, W] (intensities in any range, e.g. z-scored) and binary masks
[H, W], and an explicit ``numpy.random.Generator``; they never touch global random state. Geometric
transforms build one sampling map (affine composed with the elastic displacement) and warp image and mask
with it through ``cv2.remap`` (bilinear, reflected borders; the mask is warped as float and rounded at 0.5).

Ranges (SSL-ALPNet / ADNet / the public DMAP code): gamma ~ U(0.5, 1.5) on the slice's min-max range;
affine rotation +-5 deg, shift +-5 px, shear +-5 deg, isotropic scale U(0.9, 1.2); elastic alpha 10,
sigma 5 (pixels).

Two profiles (``augment_params``), differing in structure, not ranges:

- ``public`` (default): the public code's distribution. Its affine is built as zoom @ shear @ shift @
  rotation with rotation and zoom about the pixel (W/2, H/2) but the shear about the image origin (the
  top-left pixel), so the shear also moves the image by up to tan(5 deg) x the row index; the border is
  filled with 0 (the volume mean of z-scored images; background in the mask); the elastic field is blurred
  with a 21-tap kernel (``int(4 sigma) | 1``). The public code interpolates twice (affine, then elastic);
  here the two are composed into one sampling map (one bilinear interpolation), which gives the same
  displacements without the second blur of the image. The episode flips independent coins for the
  gamma's side and the geometry's side.
- ``compact``: rotation, shear and scale about the centre
  ((W - 1) / 2, (H - 1) / 2) then the shift, reflected border, the elastic blur OpenCV chooses for sigma 5
  (41 taps), one coin for the side that gets both gamma and geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "AugmentParams",
    "AUGMENT_PROFILES",
    "augment_params",
    "public_affine_matrix",
    "sampling_map",
    "gamma_transform",
    "random_affine_matrix",
    "elastic_displacement",
    "geometric_transform",
    "augment_pair",
    "spill_mask",
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
    #: the public code's affine composition (shear about the origin) instead of the centred one
    public_affine: bool = False
    #: fill the border with 0 instead of reflecting the image
    zero_border: bool = False
    #: taps of the elastic blur; 0 lets OpenCV choose from sigma (41 at sigma 5)
    elastic_taps: int = 0
    #: the episode draws the gamma's side and the geometry's side independently (else one coin for both)
    independent_coins: bool = False


AUGMENT_PROFILES = {
    "public": AugmentParams(public_affine=True, zero_border=True, elastic_taps=21, independent_coins=True),
    "compact": AugmentParams(),
}


def augment_params(profile: str) -> AugmentParams:
    """The ``AugmentParams`` of a named profile (``public`` or ``compact``, see the module docstring)."""
    if profile not in AUGMENT_PROFILES:
        raise ValueError(f"augment profile must be one of {tuple(AUGMENT_PROFILES)}, got {profile!r}")
    return AUGMENT_PROFILES[profile]


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


def _affine_draws(rng: np.random.Generator, rotation_deg: float, shift_px: float, shear_deg: float,
                  scale_range: tuple) -> tuple:
    """The 5 uniform draws of a random affine, in this order: rotation (deg), shift x, shift y (px),
    shear (radians), scale."""
    rot = rng.uniform(-rotation_deg, rotation_deg)
    tx, ty = rng.uniform(-shift_px, shift_px, size=2)
    shear = math.radians(rng.uniform(-shear_deg, shear_deg))
    return rot, tx, ty, shear, rng.uniform(*scale_range)


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
    rot_deg, tx, ty, shear, scale = _affine_draws(rng, rotation_deg, shift_px, shear_deg, scale_range)
    rot = math.radians(rot_deg)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot_m = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    shear_m = np.array([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
    lin = scale * rot_m @ shear_m
    centre = np.array([cx, cy])
    offset = centre - lin @ centre + np.array([tx, ty])
    return np.hstack([lin, offset[:, None]])


def public_affine_matrix(
    rng: np.random.Generator,
    shape: tuple,
    rotation_deg: float = 5.0,
    shift_px: float = 5.0,
    shear_deg: float = 5.0,
    scale_range: tuple = (0.9, 1.2),
) -> np.ndarray:
    """Random forward affine composed as the public code does: zoom @ shear @ shift @ rotation.

    Rotation and zoom are about the pixel (W/2, H/2) (the public code's centre for square slices); the
    shear ``[[1, -sin a], [0, cos a]]`` is about the origin (the top-left pixel). Same draws, in the same
    order, as :func:`random_affine_matrix`.

    Returns:
        float64 [2, 3] matrix mapping input (x, y) pixel coordinates to output coordinates.
    """
    h, w = shape
    rot, tx, ty, shear, scale = _affine_draws(rng, rotation_deg, shift_px, shear_deg, scale_range)
    centre = (w / 2.0, h / 2.0)

    def square(m: np.ndarray) -> np.ndarray:
        return np.vstack([m, [0.0, 0.0, 1.0]])

    rotation = square(cv2.getRotationMatrix2D(centre, rot, 1.0))
    shift = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    shear_m = np.array([[1.0, -math.sin(shear), 0.0], [0.0, math.cos(shear), 0.0], [0.0, 0.0, 1.0]])
    zoom = square(cv2.getRotationMatrix2D(centre, 0.0, scale))
    return (zoom @ shear_m @ shift @ rotation)[:2]


def elastic_displacement(
    rng: np.random.Generator, shape: tuple, alpha: float = 10.0, sigma: float = 5.0, taps: int = 0
) -> tuple:
    """Random smooth displacement field (Simard et al.): U(-1, 1) noise, Gaussian-smoothed, times alpha.

    Args:
        taps: odd kernel size of the blur; 0 lets OpenCV choose from sigma (41 taps at sigma 5). A shorter
            kernel, renormalised, averages fewer noise samples, so the field is larger (the public code: 21).

    Returns:
        (dx, dy), each float32 [H, W] in pixels.
    """
    h, w = shape
    ksize = (int(taps), int(taps)) if taps else (0, 0)
    noise = rng.random((2, h, w), dtype=np.float32) * 2.0 - 1.0
    dx = cv2.GaussianBlur(noise[0], ksize, sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101) * np.float32(alpha)
    dy = cv2.GaussianBlur(noise[1], ksize, sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101) * np.float32(alpha)
    return dx, dy


def sampling_map(rng: np.random.Generator, shape: tuple, params: AugmentParams = AugmentParams()) -> tuple:
    """The random geometric transform as a sampling map: output pixel p reads the input at ``A^-1 (p + d(p))``.

    Args:
        rng: Random generator (the affine's 5 draws, then the elastic noise).
        shape: (H, W).
        params: Ranges and profile (``public_affine``, ``elastic_taps``).

    Returns:
        (map_x, map_y), each float32 [H, W]: input x (column) and y (row) coordinates, in pixels.
    """
    h, w = shape
    affine = public_affine_matrix if params.public_affine else random_affine_matrix
    fwd = affine(rng, (h, w), params.rotation_deg, params.shift_px, params.shear_deg, params.scale_range)
    inv = cv2.invertAffineTransform(fwd)
    dx, dy = elastic_displacement(rng, (h, w), params.elastic_alpha, params.elastic_sigma, params.elastic_taps)
    xs = np.arange(w, dtype=np.float32)[None, :] + dx
    ys = np.arange(h, dtype=np.float32)[:, None] + dy
    map_x = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]).astype(np.float32)
    map_y = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]).astype(np.float32)
    return map_x, map_y


def geometric_transform(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    params: AugmentParams = AugmentParams(),
) -> tuple:
    """Random affine followed by elastic deformation, applied identically to image and mask.

    The output pixel p samples the input at ``A^-1 (p + d(p))`` (affine then elastic, one bilinear
    interpolation; see :func:`sampling_map`). Outside the input: reflection, or 0 with ``zero_border``.

    Args:
        image: float [H, W].
        mask: binary [H, W] (any numeric dtype).
        rng: Random generator.
        params: Augmentation ranges and profile.

    Returns:
        (image float32 [H, W], mask float32 [H, W] in {0, 1}).
    """
    map_x, map_y = sampling_map(rng, image.shape, params)
    border = cv2.BORDER_CONSTANT if params.zero_border else cv2.BORDER_REFLECT_101
    out_img = cv2.remap(np.asarray(image, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=border, borderValue=0.0)
    out_mask = cv2.remap(np.asarray(mask, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                         borderMode=border, borderValue=0.0)
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


def spill_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """A mask grown by ``radius`` pixels (dilation with a disk ``dy^2 + dx^2 <= radius^2``).

    Training episodes can give the support an annotation that overshoots the region's boundary into the
    neighbouring tissue, as manual organ masks do, so that the de-biasing selection has pixels to discard.

    Args:
        mask: [H, W] binary mask (any dtype; non-zero is foreground).
        radius: pixels (0: the mask unchanged).

    Returns:
        [H, W] mask of ``mask``'s dtype with values 0/1.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    binary = (mask != 0).astype(np.uint8)
    if radius == 0:
        return binary.astype(mask.dtype)
    dy, dx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    disk = ((dy * dy + dx * dx) <= radius * radius).astype(np.uint8)
    return cv2.dilate(binary, disk, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(mask.dtype)
