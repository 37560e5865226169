"""Bring a scan of any spacing, orientation and size into a trained model's space, and map results back.

"Model space" is the layout of the volumes a checkpoint was trained on: the training pre-processing of its
data set (:mod:`dataloaders.preprocess`, facts from :mod:`dataloaders.dataset_specifics`), step by step:

1. reorientation to the stored orientation (CHAOST2, SYNTH: LAS; none for CMR and SABS);
2. the intensity rule of the scan's modality: MR clipped above its 99.5th percentile; CT clipped to the
   registry's HU window (``dataset_specifics.ct_window_hu``: [-125, 275]) and rescaled to [0, 255];
3. the data set's border crop (SABS: 32 px);
4. linear resampling to the training spacing (SABS: in-plane spacing x 1.75, slice thickness kept);
5. centre crop/pad in-plane to the training size (images padded with their minimum, labels with 0);
6. per-volume z-score, as at training load time.

Every step keeps the physical geometry (origin, spacing, direction) of the SimpleITK image it produces, so
the way back is one resampling of the model-space result onto the scan's own grid: :func:`to_original_grid`
returns an array with the scan's exact size, and writing it with the scan as reference
(``volume_io.write_nifti_like``) gives its spacing, origin and direction. Voxels that the centre crop cut
away were never seen by the model and come back as 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from dataloaders.dataset_specifics import DatasetSpec, ct_window_hu
from dataloaders.preprocess import (clip_percentile, crop_border, crop_or_pad, read_dicom_series, resample_image,
                                    resample_label, window_ct)
from dataloaders.volume_io import read_header, read_nifti, zscore

__all__ = [
    "MODALITIES",
    "ModelSpaceScan",
    "check_scan",
    "read_scan",
    "check_same_geometry",
    "target_spacing",
    "to_model_space",
    "to_original_grid",
    "model_slice_range",
    "original_slice_range",
]

PathLike = Union[str, Path]
MODALITIES = ("mr", "ct")


@dataclass
class ModelSpaceScan:
    """A scan in a model's space, with what is needed to go back.

    Attributes:
        image: float32 [Z, H, W] z-scored model-space volume.
        label: integer [Z, H, W] label values on the model-space grid, or None.
        grid: ``SimpleITK.Image`` on the model-space grid (geometry only is used).
        original: ``SimpleITK.Image`` of the scan as read (size, spacing, origin, direction of the way back).
        steps: What was done, in order, in words (for reports).
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    grid: object
    original: object
    steps: list = field(default_factory=list)


def check_scan(path: PathLike) -> Optional[tuple]:
    """Check, from the header only, that ``path`` is a readable 3-D scalar volume (NIfTI file or DICOM folder).

    Returns:
        The size (x, y, z) in voxels for files, None for DICOM folders.

    Raises:
        FileNotFoundError: Missing file or folder, or a folder without DICOM series.
        ValueError: Unreadable, not 3-D, several components, or several DICOM series.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        series = sitk.ImageSeriesReader().GetGDCMSeriesIDs(str(path))
        if not series:
            raise FileNotFoundError(f"{path}: no DICOM series found in the folder")
        if len(series) > 1:
            raise ValueError(f"{path}: expected one DICOM series, found {len(series)}")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    reader = read_header(path)
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise ValueError(f"{path}: expected a 3-D scalar volume, got dimension {reader.GetDimension()} with "
                         f"{reader.GetNumberOfComponents()} component(s)")
    return tuple(reader.GetSize())


def read_scan(path: PathLike, label: bool = False):
    """Read a 3-D volume: a NIfTI (or other ITK-readable) file, or a folder holding one DICOM series.

    Args:
        path: File or DICOM folder.
        label: Read a label map: integer values required, returned as 32-bit integers.

    Returns:
        ``SimpleITK.Image`` (float32 for images).

    Raises:
        FileNotFoundError, ValueError: one line naming the file (see :func:`check_scan`), plus non-finite
            intensities or non-integer label values.
    """
    import SimpleITK as sitk

    path = Path(path)
    check_scan(path)
    if path.is_dir():
        img, _ = read_dicom_series(path)
    else:
        _, img = read_nifti(path)  # checks the stored values (SimpleITK reads NaN as 0) and completeness
    arr = sitk.GetArrayViewFromImage(img)
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0
    if n_bad:
        raise ValueError(f"{path}: volume contains {n_bad} NaN or infinite value(s)")
    if label:
        values = sitk.GetArrayViewFromImage(img)
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise ValueError(f"{path}: label volume contains non-integer values")
        return sitk.Cast(img, sitk.sitkInt32)
    return sitk.Cast(img, sitk.sitkFloat32)


def check_same_geometry(image, label, label_path: PathLike, tol: float = 1e-3) -> None:
    """Raise ValueError (naming ``label_path``) unless ``label`` lies on ``image``'s grid.

    Size must match exactly; spacing, origin (mm) and direction to ``tol``.
    """
    if image.GetSize() != label.GetSize():
        raise ValueError(f"{label_path}: label size {label.GetSize()} does not match image size {image.GetSize()}")
    for what, a, b in (("spacing", image.GetSpacing(), label.GetSpacing()),
                       ("origin", image.GetOrigin(), label.GetOrigin()),
                       ("direction", image.GetDirection(), label.GetDirection())):
        if not np.allclose(a, b, rtol=0.0, atol=tol):
            fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
            raise ValueError(f"{label_path}: label {what} {fmt(b)} does not match image {what} {fmt(a)}")


def target_spacing(spec: DatasetSpec, image) -> tuple:
    """Model-space spacing (x, y, z) in mm for ``image`` (after the border crop)."""
    if spec.spacing is not None:
        return tuple(float(s) for s in reversed(spec.spacing))
    if spec.inplane_scale is not None:
        sx, sy, sz = image.GetSpacing()
        k = float(spec.inplane_scale)
        return (sx * k, sy * k, sz)
    raise ValueError(f"{spec.name}: the registry gives neither a spacing nor an in-plane scale")


def _with_array(array: np.ndarray, like):
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.CopyInformation(like)
    return out


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def to_model_space(image, spec: DatasetSpec, modality: str, label=None, name: str = "<image>") -> ModelSpaceScan:
    """Apply the training pre-processing of ``spec`` to a scan (steps in the module docstring).

    Args:
        image: ``SimpleITK.Image`` float32, any geometry.
        spec: The checkpoint's data set.
        modality: ``"mr"`` or ``"ct"``: which intensity rule.
        label: Optional label ``SimpleITK.Image`` on ``image``'s grid (the support's annotation).
        name: Shown in error messages.

    Returns:
        A :class:`ModelSpaceScan`.

    Raises:
        ValueError: Unknown modality, a scan too small for the border crop, or a constant image.
    """
    import SimpleITK as sitk

    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    original = image
    steps = [f"read: size {_fmt(image.GetSize())} voxels, spacing {_fmt(image.GetSpacing())} mm, "
             f"orientation {sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())}"]
    if spec.orientation:
        image = sitk.DICOMOrient(image, spec.orientation)
        label = sitk.DICOMOrient(label, spec.orientation) if label is not None else None
        steps.append(f"reoriented to {spec.orientation}")
    arr = sitk.GetArrayFromImage(image)
    if modality == "mr":
        hi = float(np.percentile(arr, 99.5))
        image = _with_array(clip_percentile(arr), image)
        steps.append(f"MR intensities clipped above the 99.5th percentile ({hi:.4g})")
    else:
        lo, hi = ct_window_hu(spec)
        image = _with_array(window_ct(arr, (lo, hi)), image)
        steps.append(f"CT intensities clipped to [{lo:g}, {hi:g}] HU and rescaled to [0, 255]")
    del arr
    if spec.border_crop:
        try:
            image = crop_border(image, spec.border_crop)
            label = crop_border(label, spec.border_crop) if label is not None else None
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        steps.append(f"{spec.border_crop} px cropped from every in-plane border")
    spacing = target_spacing(spec, image)
    image = resample_image(image, spacing)
    steps.append(f"resampled (linear) to {_fmt(spacing)} mm: {_fmt(image.GetSize())} voxels")
    if label is not None:
        label = resample_label(label, spacing)
    size_in = tuple(reversed(image.GetSize()[:2]))
    image = crop_or_pad(image, spec.crop_size)
    steps.append(f"centre crop/pad in-plane (H x W) {_fmt(size_in)} -> {_fmt(spec.crop_size)}")
    label_arr = sitk.GetArrayFromImage(crop_or_pad(label, spec.crop_size, 0)) if label is not None else None
    z_scored = zscore(sitk.GetArrayViewFromImage(image), name)
    steps.append("z-scored over the volume")
    return ModelSpaceScan(image=z_scored, label=label_arr, grid=image, original=original, steps=steps)


def to_original_grid(volume: np.ndarray, scan: ModelSpaceScan) -> np.ndarray:
    """Resample a model-space volume (e.g. a probability map) onto the scan's own grid, linearly.

    Args:
        volume: [Z, H, W] on ``scan``'s model-space grid.
        scan: From :func:`to_model_space`.

    Returns:
        float32 array in the scan's array layout (shape = reversed ``original.GetSize()``); 0 where the
        model-space grid does not reach (parts removed by the crop).
    """
    import SimpleITK as sitk

    vol = np.asarray(volume, dtype=np.float32)
    if vol.shape != scan.image.shape:
        raise ValueError(f"volume shape {vol.shape} does not match the model-space shape {scan.image.shape}")
    # the resampled slice count is rounded, so the scan's first and last slices can lie up to half a model
    # slice beyond the grid: repeat the end slices once (nearest extrapolation along z only)
    padded = sitk.GetImageFromArray(np.concatenate([vol[:1], vol, vol[-1:]]))
    padded.SetSpacing(scan.grid.GetSpacing())
    padded.SetDirection(scan.grid.GetDirection())
    padded.SetOrigin(scan.grid.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, -1.0)))
    ref = scan.original
    out = sitk.Resample(padded, ref.GetSize(), sitk.Transform(), sitk.sitkLinear, ref.GetOrigin(),
                        ref.GetSpacing(), ref.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _slice_axis_match(scan: ModelSpaceScan) -> float:
    """Cosine between the scan's third index axis and the model grid's slice axis."""
    d_orig = np.asarray(scan.original.GetDirection()).reshape(3, 3)[:, 2]
    d_model = np.asarray(scan.grid.GetDirection()).reshape(3, 3)[:, 2]
    return float(np.dot(d_orig, d_model))


def model_slice_range(scan: ModelSpaceScan, z0: int, z1: int, name: str = "<scan>") -> tuple:
    """Model-space slice range (inclusive) covering the scan's slices ``z0..z1`` (third index axis, inclusive).

    Raises:
        ValueError: Indices outside the scan, or the scan's third axis is not the model's slice axis.
    """
    n = scan.original.GetSize()[2]
    if not (0 <= z0 <= z1 < n):
        raise ValueError(f"{name}: slice range {z0} {z1} is not within 0..{n - 1} (first <= last)")
    if abs(_slice_axis_match(scan)) < 0.5:
        raise ValueError(f"{name}: the scan's slices (third axis) are not axial in the model's orientation; "
                         "omit the slice range to estimate it")
    cx, cy = [(s - 1) / 2.0 for s in scan.original.GetSize()[:2]]
    ks = [scan.grid.TransformPhysicalPointToContinuousIndex(
        scan.original.TransformContinuousIndexToPhysicalPoint((cx, cy, float(z))))[2] for z in (z0, z1)]
    last = scan.image.shape[0] - 1
    m0 = min(max(int(math.floor(min(ks) + 0.5)), 0), last)
    m1 = min(max(int(math.floor(max(ks) + 0.5)), 0), last)
    return m0, m1


def original_slice_range(scan: ModelSpaceScan, m0: int, m1: int) -> Optional[tuple]:
    """The scan's slice indices (third axis, inclusive) nearest to model-space slices ``m0..m1``.

    Returns None when the scan's third axis is not the model's slice axis.
    """
    if abs(_slice_axis_match(scan)) < 0.5:
        return None
    h, w = scan.image.shape[1:]
    n = scan.original.GetSize()[2]
    ks = [scan.original.TransformPhysicalPointToContinuousIndex(
        scan.grid.TransformContinuousIndexToPhysicalPoint(((w - 1) / 2.0, (h - 1) / 2.0, float(m))))[2]
        for m in (m0, m1)]
    return tuple(min(max(int(math.floor(k + 0.5)), 0), n - 1) for k in sorted(ks))
