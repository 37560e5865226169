"""Synthetic abdominal-MR-like phantoms: the embedded default data set (SYNTH).

``python -m dataloaders.synthetic --out-dir DIR [--n-volumes 10] [--size 128] [--seed 0]`` writes
``image_<id>.nii.gz`` (float32, raw-MR-like intensities, about 0-1000) and ``label_<id>.nii.gz`` (uint8) for
ids 1..n, in the on-disk layout of CHAOST2 (see ``dataloaders.volume_io``), so every tool that reads CHAOST2
reads it. Label ids, the default in-plane size and pixel spacing, and the stored orientation are those of
the SYNTH registry entry (1 liver, 2 right kidney, 3 left kidney, 4 spleen; 128 px of 2.5 mm; LAS).

Each volume is drawn from ``numpy.random.default_rng([seed, index])``: the same seed gives the same files.

Anatomy (array axes Z, H, W; z increases towards the head; like the public CHAOST2 release the posterior side
is at the top rows, the patient's right on the left columns):

- body: elliptic cross-section with a subcutaneous fat ring, soft-tissue background texture;
- spine: vertebral body, bright spinal canal, two paraspinal muscles;
- bowel-like blobs (bright fluid or dark gas) in the anterior half, an aorta (flow void) left of the spine;
- liver (large, right, upper ~60 % of the slices, two lobes), kidneys (posterior, bean-shaped with a hilum
  and darker medulla, ~35-45 % of the slices, the left one higher), spleen (left, posterior-lateral, crescent);
- every organ: random size, position, in-plane rotation and smooth boundary deformation; organ-specific mean
  intensity and texture; then a partial-volume blur, a smooth multiplicative bias field and Rician noise.

Spacing: in-plane 320 / size mm (2.5 mm at 128 px), slice thickness U(5, 8) mm (the registry's 6.5 mm is its
mean), 20-32 slices.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from dataloaders.dataset_specifics import get_dataset_spec

__all__ = ["generate_phantom", "generate_synthetic_dataset", "main"]

_SPEC = get_dataset_spec("SYNTH")
DEFAULT_SIZE = _SPEC.crop_size[1]
#: Field of view (mm) of every phantom whatever its size: the registry's pixel spacing at the default size.
FOV_MM = _SPEC.spacing[2] * DEFAULT_SIZE
SLICE_THICKNESS_MM = (5.0, 8.0)  # drawn uniformly per volume
_ORGAN_LABELS = {name: lid for lid, name in _SPEC.label_names.items()}


class _Grid:
    """Physical coordinates (mm) of the voxel centres, broadcastable: z [Z,1,1], y [1,H,1], x [1,1,W]."""

    def __init__(self, n_z: int, size: int, sz: float, sxy: float):
        self.z = ((np.arange(n_z, dtype=np.float32) + 0.5) * sz)[:, None, None]
        c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * sxy
        self.y = c[None, :, None]
        self.x = c[None, None, :]
        self.extent_z = n_z * sz
        self.shape = (n_z, size, size)


def _smooth_field(rng: np.random.Generator, grid: _Grid, wavelength: tuple, n_terms: int = 3) -> np.ndarray:
    """Sum of random plane waves, normalised to about [-1, 1]; wavelengths in mm."""
    out = np.zeros(grid.shape, dtype=np.float32)
    for _ in range(n_terms):
        lam = rng.uniform(*wavelength)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d) + 1e-9
        phase = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / lam
        out += np.sin(k * (d[0] * grid.z + d[1] * grid.y + d[2] * grid.x) + phase).astype(np.float32)
    return out / np.float32(n_terms**0.5)


def _ellipsoid(grid: _Grid, centre: tuple, semi: tuple, angle_deg: float = 0.0) -> np.ndarray:
    """Normalised ellipsoid function f (f < 1 inside); centre (z, y, x) and semi-axes in mm, rotated in-plane."""
    cz, cy, cx = centre
    az, ay, ax = semi
    a = math.radians(angle_deg)
    dy = grid.y - cy
    dx = grid.x - cx
    u = math.cos(a) * dx + math.sin(a) * dy
    v = -math.sin(a) * dx + math.cos(a) * dy
    return ((grid.z - cz) / az) ** 2 + (v / ay) ** 2 + (u / ax) ** 2


def _blob(rng, grid: _Grid, centre: tuple, semi: tuple, angle: float, wobble: float = 0.15) -> np.ndarray:
    """Boolean mask of a smoothly deformed ellipsoid."""
    f = _ellipsoid(grid, centre, semi, angle)
    if wobble > 0:
        f = f * (1.0 + wobble * _smooth_field(rng, grid, (50.0, 120.0)))
    return f < 1.0


def _texture(rng: np.random.Generator, shape: tuple, sigma_px: float) -> np.ndarray:
    """Unit-std Gaussian-smoothed noise [Z, H, W] (smoothed in-plane)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0:
        for k in range(shape[0]):
            noise[k] = cv2.GaussianBlur(noise[k], (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REFLECT_101)
    return noise / np.float32(noise.std() + 1e-6)


def generate_phantom(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple:
    """Draw one phantom.

    Args:
        rng: Random generator (all randomness of the volume).
        size: In-plane size H = W in pixels (>= 32).

    Returns:
        (image float32 [Z, H, W], label uint8 [Z, H, W], spacing (z, y, x) in mm).
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    n_z = int(rng.integers(20, 33))
    sz = round(float(rng.uniform(*SLICE_THICKNESS_MM)), 2)
    sxy = FOV_MM / size
    g = _Grid(n_z, size, sz, sxy)
    # patients lie off-centre in the field of view: shift every structure by the same in-plane offset
    g.x = g.x - np.float32(rng.uniform(-10, 10))
    g.y = g.y - np.float32(rng.uniform(-10, 10))
    ez = g.extent_z
    sxy_px = 1.0 / sxy  # pixels per mm

    image = np.zeros(g.shape, dtype=np.float32)
    label = np.zeros(g.shape, dtype=np.uint8)
    fine = _texture(rng, g.shape, 0.8)
    coarse = _texture(rng, g.shape, 3.0)

    def paint(mask: np.ndarray, mean: float, a_fine: float, a_coarse: float) -> None:
        val = mean * (1.0 + a_fine * fine + a_coarse * coarse)
        np.copyto(image, val.astype(np.float32), where=mask)

    # Body outline and fat ring.
    bx = rng.uniform(120, 148)
    by = rng.uniform(88, 116)
    taper = 1.0 + 0.04 * np.sin(2 * np.pi * (g.z / ez) + rng.uniform(0, 2 * np.pi))
    wob = 1.0 + 0.03 * _smooth_field(rng, g, (80.0, 200.0))
    body_f = ((g.x / (bx * taper)) ** 2 + (g.y / (by * taper)) ** 2) * wob
    body = body_f < 1.0
    fat_t = rng.uniform(10, 20)
    inner = ((g.x / (bx * taper - fat_t)) ** 2 + (g.y / (by * taper - fat_t)) ** 2) * wob < 1.0
    paint(body, rng.uniform(380, 440), 0.05, 0.04)  # subcutaneous fat
    paint(inner, rng.uniform(230, 260), 0.08, 0.10)  # soft tissue / mesentery

    # Spine (posterior = negative y = top rows), paraspinal muscles, aorta.
    post = -by + fat_t
    vert_c = post + rng.uniform(38, 46)
    paint(_blob(rng, g, (ez / 2, post + 32, -36), (ez, 20, 24), 0, 0.05), rng.uniform(150, 180), 0.05, 0.05)
    paint(_blob(rng, g, (ez / 2, post + 32, 36), (ez, 20, 24), 0, 0.05), rng.uniform(150, 180), 0.05, 0.05)
    paint(_blob(rng, g, (ez / 2, vert_c, 0), (ez, 16, 19), 0, 0.03), rng.uniform(120, 150), 0.15, 0.1)
    paint(_blob(rng, g, (ez / 2, vert_c - 24, 0), (ez, 6, 7), 0, 0.0), rng.uniform(600, 700), 0.03, 0.0)
    paint(_blob(rng, g, (ez / 2, vert_c + 26, 14), (ez, 9, 9), 0, 0.0), rng.uniform(40, 70), 0.1, 0.0)

    # Bowel-like blobs in the anterior half.
    for _ in range(int(rng.integers(4, 9))):
        c = (rng.uniform(0.1, 0.9) * ez, rng.uniform(0.1, 0.7) * by, rng.uniform(-0.6, 0.6) * bx)
        s = (rng.uniform(15, 40), rng.uniform(10, 28), rng.uniform(10, 35))
        m = _blob(rng, g, c, s, rng.uniform(0, 180), 0.2) & inner
        if rng.random() < 0.25:
            paint(m, rng.uniform(30, 60), 0.2, 0.1)  # gas
        else:
            paint(m, rng.uniform(450, 750), 0.12, 0.15)  # fluid-filled loop

    def jitter(c: tuple, mm: float = 14.0) -> tuple:
        return (c[0] + rng.uniform(-0.07, 0.07) * ez, c[1] + rng.uniform(-mm, mm), c[2] + rng.uniform(-mm, mm))

    def scaled(s: tuple, lo: float = 0.8, hi: float = 1.2) -> tuple:
        k = rng.uniform(lo, hi)
        return tuple(v * k for v in s)

    # Liver: right lobe (image left) + left lobe crossing the midline anteriorly; upper slices.
    lz = rng.uniform(0.62, 0.72) * ez
    lsz = rng.uniform(0.30, 0.36) * ez
    right = _blob(rng, g, jitter((lz, 0.05 * by, -0.45 * bx)), scaled((lsz, 0.62 * by, 0.36 * bx)),
                  rng.uniform(-15, 15), 0.12)
    left = _blob(rng, g, jitter((lz + 0.05 * ez, 0.35 * by, -0.05 * bx)), scaled((0.7 * lsz, 0.28 * by, 0.3 * bx)),
                 rng.uniform(-20, 20), 0.15)
    liver = (right | left) & inner
    paint(liver, rng.uniform(115, 140), 0.04, 0.06)
    label[liver] = _ORGAN_LABELS["liver"]

    # Spleen: crescent, image right, posterior-lateral, mid-upper slices.
    sc = jitter((rng.uniform(0.56, 0.66) * ez, -0.25 * by, 0.62 * bx))
    ss = scaled((rng.uniform(0.17, 0.22) * ez, 0.42 * by, 0.24 * bx))
    ang = rng.uniform(20, 45)
    spleen = _blob(rng, g, sc, ss, ang, 0.1)
    a = math.radians(ang)
    cut_c = (sc[0], sc[1] - ss[2] * math.sin(a), sc[2] - ss[2] * math.cos(a))
    spleen &= ~_blob(rng, g, cut_c, (ss[0] * 1.2, ss[1] * 0.7, ss[2] * 0.55), ang, 0.0)
    spleen &= inner
    paint(spleen, rng.uniform(300, 340), 0.05, 0.05)
    label[spleen] = _ORGAN_LABELS["spleen"]

    # Kidneys: posterior, beside the spine; bean shape (hilum notch), darker medulla; the left one higher.
    for name, side, zc in (("right_kidney", -1.0, rng.uniform(0.36, 0.44)), ("left_kidney", 1.0, rng.uniform(0.42, 0.5))):
        kc = jitter((zc * ez, vert_c + rng.uniform(-4, 8), side * rng.uniform(48, 62)), 8.0)
        ks = scaled((rng.uniform(0.17, 0.22) * ez, 30.0, 22.0))
        kang = side * rng.uniform(10, 30)
        f = _ellipsoid(g, kc, ks, kang) * (1.0 + 0.08 * _smooth_field(rng, g, (40.0, 90.0)))
        kid = f < 1.0
        hilum = _ellipsoid(g, (kc[0], kc[1] + 4, kc[2] - side * ks[2] * 0.9), (ks[0] * 0.5, 9, 10)) < 1.0
        kid &= ~hilum
        kid &= inner
        cortex_val = rng.uniform(430, 480)
        paint(kid, cortex_val, 0.04, 0.03)
        paint(kid & (f < 0.45), cortex_val * rng.uniform(0.7, 0.8), 0.06, 0.03)
        label[kid] = _ORGAN_LABELS[name]

    # Acquisition: partial-volume blur, bias field, Rician noise.
    for k in range(n_z):
        image[k] = cv2.GaussianBlur(image[k], (0, 0), sigmaX=0.6 * 2.5 * sxy_px, borderType=cv2.BORDER_REFLECT_101)
    image *= np.exp(0.2 * _smooth_field(rng, g, (300.0, 600.0), 2)).astype(np.float32)
    sigma = np.float32(rng.uniform(6, 12))
    n1 = rng.standard_normal(g.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(g.shape, dtype=np.float32) * sigma
    image = np.sqrt((image + n1) ** 2 + n2**2).astype(np.float32)
    return image, label, (sz, sxy, sxy)


def _check_phantom(label: np.ndarray) -> Optional[str]:
    """Reason a phantom is unusable (an organ in fewer than 3 slices), or None."""
    for name, lid in _ORGAN_LABELS.items():
        n = int((label == lid).reshape(label.shape[0], -1).any(axis=1).sum())
        if n < 3:
            return f"{name} in {n} slices"
    return None


def generate_synthetic_dataset(
    out_dir: Union[str, Path], n_volumes: int = 10, size: int = DEFAULT_SIZE, seed: int = 0
) -> list:
    """Write ``n_volumes`` phantoms as ``image_<id>.nii.gz`` / ``label_<id>.nii.gz``, ids 1..n_volumes.

    Args:
        out_dir: Output folder (created).
        n_volumes: Number of volumes (>= 1).
        size: In-plane size in pixels.
        seed: Seed; volume i is drawn from ``default_rng([seed, i, attempt])``.

    Returns:
        Paths of the written image files, in id order.
    """
    from dataloaders.volume_io import image_path, label_path, write_nifti_like  # lazy: SimpleITK import
    import SimpleITK as sitk

    if n_volumes < 1:
        raise ValueError(f"n_volumes must be >= 1, got {n_volumes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_volumes):
        for attempt in range(10):
            image, label, spacing = generate_phantom(np.random.default_rng([seed, i, attempt]), size)
            if _check_phantom(label) is None:
                break
        else:  # pragma: no cover - organ placement keeps every organ inside the volume
            raise RuntimeError(f"phantom {i + 1}: {_check_phantom(label)} after 10 attempts")
        ref = sitk.GetImageFromArray(image)
        ref.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        # diag(1, -1, 1) for LAS, like the public CHAOST2 files
        ref.SetDirection(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(_SPEC.orientation))
        half = (size - 1) / 2.0 * spacing[1]
        ref.SetOrigin((-half, half, 0.0))
        case_id = i + 1
        paths.append(write_nifti_like(image, ref, image_path(out, case_id)))
        write_nifti_like(label, ref, label_path(out, case_id))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m dataloaders.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--n-volumes", type=int, default=10, help="number of volumes (default 10)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"in-plane size in pixels (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    try:
        paths = generate_synthetic_dataset(args.out_dir, args.n_volumes, args.size, args.seed)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {len(paths)} volumes to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
