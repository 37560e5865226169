"""Pre-processing of the public raw data sets into the training layout (Ouyang et al. protocol).

``python -m dataloaders.preprocess --dataset {CHAOST2,SABS,CMR} --raw-dir RAW --out-dir OUT [--ids ...]``
writes ``OUT/image_<id>.nii.gz`` (float32) and ``OUT/label_<id>.nii.gz`` (uint8; uint16 for CMR's raw
values) with correct geometry (spacing, origin, direction). No external binary is needed (DICOM is read
with SimpleITK's series reader).

Raw folder layouts expected (RAW is the folder passed as ``--raw-dir``). Which layout a data set has is a
registry fact (``DatasetSpec.raw_layout``); :data:`RAW_LAYOUTS` maps each layout to the functions that find and
convert its cases, so ``--dataset`` accepts exactly the registry's data sets with a raw layout. Intensity and
label conventions of the raw files (PNG grey values, CT window, raw label values) come from the spec too.

CHAOST2 (layout ``chaos_dicom_png``: CHAOS challenge, MR T2-SPIR)::

    RAW/Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm     one DICOM series per patient
    RAW/Train_Sets/MR/<id>/T2SPIR/Ground/*.png         one mask per DICOM frame, values 63/126/189/252

  (``RAW/MR/<id>/...`` and ``RAW/<id>/...`` are accepted too.) Output ids = the CHAOS patient ids
  (1, 2, 3, 5, 8, ...), as in the public release.

SABS (layout ``sabs_nifti``: Synapse multi-organ CT, "Abdomen" training set)::

    RAW/img/img00XX.nii.gz
    RAW/label/label00XX.nii.gz

  Output ids = positions 0..N-1 of the raw cases sorted by number (img0001 -> 0, ..., img0040 -> 29),
  as in the public release; the mapping is printed.

CMR (layout ``cmr_nifti``: MS-CMRSeg 2019, the bSSFP "C0" sequence)::

    RAW/patient<id>_C0.nii.gz
    RAW/patient<id>_C0_manual.nii.gz                  values 0, 200 (LV-MYO), 500 (LV-BP), 600 (RV)

  (files may also sit in sub-folders of RAW). Output ids = patient numbers. Label values are kept raw
  (200/500/600) on disk and mapped to 1/2/3 at load time (``DatasetSpec.raw_label_map``).

Steps (docs/protocol.md, "Pre-processing"; the numbers are the registry's):

- CHAOST2: DICOM series -> volume; PNG masks -> label volume (see "mask alignment" below); both reoriented
  to the array layout of the public release (``sitk.DICOMOrient(..., "LAS")``: direction diag(1, -1, 1),
  posterior at the top rows); clip intensities above the volume's 99.5th percentile; resample to
  1.25 x 1.25 x 7.70 mm; centre crop/pad in-plane to 256 x 256.
- CMR: the same from NIfTI (no reorientation), spacing 1.25 x 1.25 x 7.99 mm.
- SABS: clip HU to [-125, 275] and rescale to [0, 255]; crop 32 px from every in-plane border; in-plane
  spacing x 1.75 (z kept); result exactly 256 x 256 in-plane.
- Resampling: images linear; labels one class at a time (binary mask, linear, then the class with the
  largest value >= 0.5, else background). Crop/pad: images padded with their minimum, labels with 0.
- Resampled size per axis (``--resample-size``): ``public`` (default) ``int(n * s / t + 1)``, as the public
  scripts, whose volumes therefore often end with an extra, all-zero slice (Synapse: 257 x 257 before the
  crop to 256); ``round`` gives ``round(n * s / t)``, the nearest whole number of voxels.

Mask alignment (CHAOS): the public notebook converts the DICOM series with ``dcm2nii`` (which stores the
rows bottom-up) and therefore flips the stacked PNG masks along the second array axis. Here the DICOM series
is read with SimpleITK, whose arrays keep the DICOM row order -- the order of the PNG rows -- so a mask is
aligned to its frame **without** an in-plane flip (``flip_rows=False`` in ``chaos_label_array``); each PNG
is matched to its DICOM frame by file stem (``IMG-0002-00001.png`` <-> ``IMG-0002-00001.dcm``), falling back
to sorted-name order, so the z order follows the series reader's geometric sort. The flip of the public
release appears only afterwards, as a geometry-preserving reorientation of image and label together to the
spec's orientation ("LAS").
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

from dataloaders.dataset_specifics import DatasetSpec, get_dataset_spec, raw_dataset_names

__all__ = [
    "RAW_LAYOUTS",
    "read_dicom_series",
    "read_png_masks",
    "chaos_label_array",
    "RESAMPLE_SIZE_RULES",
    "resampled_size",
    "clip_percentile",
    "window_ct",
    "crop_border",
    "resample_image",
    "resample_label",
    "crop_or_pad",
    "preprocess_chaos_case",
    "preprocess_cmr_case",
    "preprocess_sabs_case",
    "find_cases",
    "preprocess_dataset",
    "main",
]

PathLike = Union[str, Path]

RESAMPLE_SIZE_RULES = ("public", "round")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_dicom_series(folder: PathLike):
    """Read the DICOM series of a folder with SimpleITK.

    Args:
        folder: Folder holding one DICOM series.

    Returns:
        (``SimpleITK.Image`` float32 with the series geometry, list of the file paths in the reader's slice
        order, i.e. sorted along the slice normal).

    Raises:
        FileNotFoundError: Folder missing or without a DICOM series.
        ValueError: More than one series in the folder.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: DICOM folder not found")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise FileNotFoundError(f"{folder}: no DICOM series found")
    if len(series) > 1:
        raise ValueError(f"{folder}: expected one DICOM series, found {len(series)}")
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.SetFileNames(files)
    img = reader.Execute()
    return sitk.Cast(img, sitk.sitkFloat32), [Path(f) for f in files]


def read_png_masks(paths: Sequence[PathLike], spec: Optional[DatasetSpec] = None) -> np.ndarray:
    """Read CHAOS ground-truth PNGs and map their grey values to label ids.

    Args:
        paths: PNG files, one per frame, in the wanted order.
        spec: Data set facts, its ``png_label_values`` ranges (default CHAOST2).

    Returns:
        uint8 [Z, H, W] label ids (0 and the keys of ``png_label_values``).

    Raises:
        ValueError: A PNG holds a grey value outside the ranges, or the sizes differ.
    """
    from PIL import Image

    ranges = (spec or get_dataset_spec("CHAOST2")).png_label_values
    expected = ", ".join(f"{lo}-{hi}" for lo, hi in ranges.values())
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L"), dtype=np.uint8)
        lab = np.zeros(arr.shape, dtype=np.uint8)
        known = arr == 0
        for lid, (lo, hi) in ranges.items():
            m = (arr >= lo) & (arr <= hi)
            lab[m] = lid
            known |= m
        if not known.all():
            bad = sorted(set(np.unique(arr[~known]).tolist()))[:5]
            raise ValueError(f"{p}: unexpected mask grey value(s) {bad}; expected 0 or a value in {expected}")
        if out and lab.shape != out[0].shape:
            raise ValueError(f"{p}: mask size {lab.shape} differs from {out[0].shape} of {paths[0]}")
        out.append(lab)
    return np.stack(out)


def chaos_label_array(dicom_files: Sequence[PathLike], png_files: Sequence[PathLike], flip_rows: bool = False,
                      spec: Optional[DatasetSpec] = None) -> np.ndarray:
    """Stack CHAOS masks in the slice order of the DICOM series read by SimpleITK.

    Args:
        dicom_files: DICOM files in the series reader's order (``read_dicom_series``).
        png_files: Ground-truth PNGs (any order).
        flip_rows: Flip every mask along its rows (array axis 1). False is correct for volumes read with
            SimpleITK (DICOM row order); True reproduces the public notebook's flip, which is correct only
            for ``dcm2nii`` output.
        spec: Data set facts, its PNG grey-value ranges (default CHAOST2).

    Returns:
        uint8 [Z, H, W] with Z = len(dicom_files).

    Raises:
        ValueError: Counts differ, or PNGs and DICOM files cannot be matched.
    """
    dicom_files = [Path(p) for p in dicom_files]
    png_files = sorted((Path(p) for p in png_files), key=lambda p: _natural_key(p.name))
    if len(png_files) != len(dicom_files):
        where = png_files[0].parent if png_files else "ground-truth folder"
        raise ValueError(f"{where}: {len(png_files)} mask PNGs for {len(dicom_files)} DICOM frames")
    by_stem = {p.stem: p for p in png_files}
    if all(d.stem in by_stem for d in dicom_files):
        ordered = [by_stem[d.stem] for d in dicom_files]
    else:  # frame order: i-th PNG by name <-> i-th DICOM file by name
        name_order = sorted(dicom_files, key=lambda p: _natural_key(p.name))
        frame = {d: png_files[i] for i, d in enumerate(name_order)}
        ordered = [frame[d] for d in dicom_files]
    lab = read_png_masks(ordered, spec)
    if flip_rows:
        lab = lab[:, ::-1, :].copy()
    return lab


def clip_percentile(image: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Clip intensities above the volume's ``percentile`` (float32)."""
    hi = np.percentile(image, percentile)
    return np.minimum(image, hi).astype(np.float32)


def window_ct(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip CT intensities to the HU ``window`` (low, high) and rescale it to [0, 255] (float32).

    The window is a registry fact: ``DatasetSpec.intensity_window_hu`` (SABS: [-125, 275]).
    """
    lo, hi = window
    return (np.clip(np.asarray(image, dtype=np.float32), lo, hi) - lo) * np.float32(255.0 / (hi - lo))


def crop_border(img, border: int):
    """Remove ``border`` pixels from every in-plane edge of a ``SimpleITK.Image`` (geometry kept).

    Raises:
        ValueError: The image is too small for the crop.
    """
    import SimpleITK as sitk

    w, h = img.GetSize()[:2]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"in-plane size {h}x{w} too small for the {border}-px border crop")
    arr = sitk.GetArrayViewFromImage(img)[:, border : h - border, border : w - border]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(img.GetDirection())
    out.SetOrigin(img.TransformIndexToPhysicalPoint((border, border, 0)))
    return out


def resampled_size(n: int, spacing: float, target: float, rule: str = "public") -> int:
    """Voxels along one axis after resampling ``n`` voxels of ``spacing`` mm to ``target`` mm.

    Args:
        rule: ``public``: ``int(n * spacing / target + 1)`` (the public pre-processing scripts; one voxel
            more than the extent needs whenever the ratio is a whole number); ``round``: the nearest integer.

    Returns:
        The size, at least 1.
    """
    if rule not in RESAMPLE_SIZE_RULES:
        raise ValueError(f"resample size rule must be one of {RESAMPLE_SIZE_RULES}, got {rule!r}")
    extent = n * spacing / target
    return max(1, int(extent + 1) if rule == "public" else int(round(extent)))


def _resample(img, spacing_xyz: Sequence[float], interpolator, default: float, size=None, size_rule: str = "public"):
    import SimpleITK as sitk

    old_sp = img.GetSpacing()
    old_sz = img.GetSize()
    if size is None:
        size = [resampled_size(n, s, t, size_rule) for n, s, t in zip(old_sz, old_sp, spacing_xyz)]
    return sitk.Resample(
        img, [int(v) for v in size], sitk.Transform(), interpolator, img.GetOrigin(), tuple(float(s) for s in spacing_xyz),
        img.GetDirection(), float(default), img.GetPixelID(),
    )


def resample_image(img, spacing_xyz: Sequence[float], size_rule: str = "public"):
    """Linear resampling of a ``SimpleITK.Image`` to ``spacing_xyz`` (x, y, z mm), origin and direction kept.

    ``size_rule``: see :func:`resampled_size`.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)
    return _resample(img, spacing_xyz, sitk.sitkLinear, float(arr.min()), size_rule=size_rule)


def resample_label(label_img, spacing_xyz: Sequence[float], size_rule: str = "public"):
    """Resample a label image one class at a time (linear on the binary mask, then arg-max with 0.5 floor).

    ``size_rule``: see :func:`resampled_size`.

    Returns:
        ``SimpleITK.Image`` of the label's pixel type on the new grid.
    """
    import SimpleITK as sitk

    lab = sitk.GetArrayFromImage(label_img)
    classes = [int(c) for c in np.unique(lab) if c != 0]
    ref = _resample(sitk.Cast(label_img, sitk.sitkFloat32), spacing_xyz, sitk.sitkNearestNeighbor, 0.0,
                    size_rule=size_rule)
    out = np.zeros(sitk.GetArrayViewFromImage(ref).shape, dtype=lab.dtype)
    best = np.full(out.shape, 0.5, dtype=np.float32)
    for c in classes:
        m = sitk.GetImageFromArray((lab == c).astype(np.float32))
        m.CopyInformation(label_img)
        r = sitk.GetArrayFromImage(_resample(m, spacing_xyz, sitk.sitkLinear, 0.0, size_rule=size_rule))
        take = r >= best
        out[take] = c
        best[take] = r[take]
    res = sitk.GetImageFromArray(out)
    res.CopyInformation(ref)
    return res


def crop_or_pad(img, size_hw: Sequence[int], pad_value: Optional[float] = None):
    """Centre crop or pad a ``SimpleITK.Image`` in-plane to (H, W); the origin follows (geometry kept).

    Args:
        img: 3-D image.
        size_hw: Target (H, W).
        pad_value: Padding value; None pads with the image minimum.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    z, h, w = arr.shape
    th, tw = int(size_hw[0]), int(size_hw[1])
    if pad_value is None:
        pad_value = float(arr.min())
    out = np.full((z, th, tw), pad_value, dtype=arr.dtype)
    y0 = (h - th) // 2  # source row of output row 0 (negative: padding)
    x0 = (w - tw) // 2
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + th, h), min(x0 + tw, w)
    out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[:, sy0:sy1, sx0:sx1]
    res = sitk.GetImageFromArray(out)
    res.SetSpacing(img.GetSpacing())
    res.SetDirection(img.GetDirection())
    res.SetOrigin(img.TransformContinuousIndexToPhysicalPoint((float(x0), float(y0), 0.0)))
    return res


def _finish(img, lab, spacing_zyx, size_hw, clip: bool, size_rule: str = "public"):
    """Clip (99.5th percentile), resample, crop/pad; returns (image, label) SimpleITK images."""
    import SimpleITK as sitk

    if clip:
        arr = clip_percentile(sitk.GetArrayFromImage(img))
        c = sitk.GetImageFromArray(arr)
        c.CopyInformation(img)
        img = c
    sp_xyz = tuple(reversed(spacing_zyx))
    img = resample_image(img, sp_xyz, size_rule)
    lab = resample_label(lab, sp_xyz, size_rule)
    img = crop_or_pad(img, size_hw)
    lab = crop_or_pad(lab, size_hw, 0)
    return img, lab


def _check_finite(arr: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: image contains NaN or infinite values")


def preprocess_chaos_case(case_dir: PathLike, spec: Optional[DatasetSpec] = None, reorient: bool = True,
                          size_rule: str = "public"):
    """One CHAOS T2-SPIR case: ``case_dir/T2SPIR/DICOM_anon/*.dcm`` + ``case_dir/T2SPIR/Ground/*.png``.

    Args:
        case_dir: The patient folder ``.../MR/<id>``.
        spec: Data set facts (default CHAOST2): PNG grey values, spacing, orientation, crop size.
        reorient: Reorient image and label to ``spec.orientation`` with ``sitk.DICOMOrient`` (False, or a
            spec without orientation: keep the series' orientation).
        size_rule: Resampled size per axis, ``public`` or ``round`` (:func:`resampled_size`).

    Returns:
        (image ``SimpleITK.Image`` float32, label ``SimpleITK.Image`` uint8).
    """
    import SimpleITK as sitk

    spec = spec or get_dataset_spec("CHAOST2")
    case_dir = Path(case_dir)
    dcm_dir = case_dir / "T2SPIR" / "DICOM_anon"
    gt_dir = case_dir / "T2SPIR" / "Ground"
    img, files = read_dicom_series(dcm_dir)
    _check_finite(sitk.GetArrayViewFromImage(img), dcm_dir)
    pngs = sorted(gt_dir.glob("*.png")) if gt_dir.is_dir() else []
    if not pngs:
        raise FileNotFoundError(f"{gt_dir}: no ground-truth PNG masks found")
    lab_arr = chaos_label_array(files, pngs, spec=spec)
    if lab_arr.shape != sitk.GetArrayViewFromImage(img).shape:
        raise ValueError(
            f"{gt_dir}: mask stack shape {lab_arr.shape} does not match DICOM volume "
            f"{sitk.GetArrayViewFromImage(img).shape}"
        )
    lab = sitk.GetImageFromArray(lab_arr)
    lab.CopyInformation(img)
    if reorient and spec.orientation:
        img = sitk.DICOMOrient(img, spec.orientation)
        lab = sitk.DICOMOrient(lab, spec.orientation)
    return _finish(img, lab, spec.spacing, spec.crop_size, clip=True, size_rule=size_rule)


def _read_nifti_checked(path: Path):
    import SimpleITK as sitk

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise ValueError(f"{path}: cannot read as an image") from None


def _check_same_grid(img, lab, lab_path: Path) -> None:
    if img.GetSize() != lab.GetSize():
        raise ValueError(f"{lab_path}: label size {lab.GetSize()} does not match image size {img.GetSize()}")


def preprocess_cmr_case(image_file: PathLike, label_file: PathLike, spec: Optional[DatasetSpec] = None,
                        size_rule: str = "public"):
    """One MS-CMRSeg bSSFP case (NIfTI); label values kept raw (0/200/500/600, uint16).

    Returns:
        (image ``SimpleITK.Image`` float32, label ``SimpleITK.Image`` uint16).
    """
    import SimpleITK as sitk

    spec = spec or get_dataset_spec("CMR")
    image_file, label_file = Path(image_file), Path(label_file)
    img = sitk.Cast(_read_nifti_checked(image_file), sitk.sitkFloat32)
    _check_finite(sitk.GetArrayViewFromImage(img), image_file)
    lab = _read_nifti_checked(label_file)
    _check_same_grid(img, lab, label_file)
    arr = np.rint(sitk.GetArrayFromImage(lab)).astype(np.int64)
    spec.check_raw_values(np.unique(arr), label_file)
    lab2 = sitk.GetImageFromArray(arr.astype(np.uint16))
    lab2.CopyInformation(img)
    return _finish(img, lab2, spec.spacing, spec.crop_size, clip=True, size_rule=size_rule)


def preprocess_sabs_case(image_file: PathLike, label_file: PathLike, spec: Optional[DatasetSpec] = None,
                         size_rule: str = "public"):
    """One Synapse CT case: HU window -> [0, 255], border crop, in-plane spacing scaled.

    The window, crop and scale are the spec's ``intensity_window_hu``, ``border_crop`` and ``inplane_scale``
    (SABS: [-125, 275] HU, 32 px, x 1.75).

    Returns:
        (image ``SimpleITK.Image`` float32, label ``SimpleITK.Image`` uint8), exactly 256 x 256 in-plane.
    """
    import SimpleITK as sitk

    spec = spec or get_dataset_spec("SABS")
    image_file, label_file = Path(image_file), Path(label_file)
    img = _read_nifti_checked(image_file)
    lab = _read_nifti_checked(label_file)
    _check_same_grid(img, lab, label_file)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    _check_finite(arr, image_file)
    larr = np.rint(sitk.GetArrayFromImage(lab)).astype(np.int64)
    spec.check_raw_values(np.unique(larr), label_file)
    windowed = sitk.GetImageFromArray(window_ct(arr, spec.intensity_window_hu))
    new_lab = sitk.GetImageFromArray(larr.astype(np.uint8))
    for im in (windowed, new_lab):
        im.CopyInformation(img)
    try:
        new_img = crop_border(windowed, spec.border_crop)
        new_lab = crop_border(new_lab, spec.border_crop)
    except ValueError as exc:
        raise ValueError(f"{image_file}: {exc}") from None
    sx, sy, sz = img.GetSpacing()
    k = float(spec.inplane_scale)
    sp_xyz = (sx * k, sy * k, sz)
    new_img = resample_image(new_img, sp_xyz, size_rule)
    new_lab = resample_label(new_lab, sp_xyz, size_rule)
    new_img = crop_or_pad(new_img, spec.crop_size)
    new_lab = crop_or_pad(new_lab, spec.crop_size, 0)
    return new_img, new_lab


def _chaos_root(raw: Path) -> Path:
    for cand in (raw / "Train_Sets" / "MR", raw / "MR", raw):
        if cand.is_dir() and any((d / "T2SPIR").is_dir() for d in cand.iterdir() if d.is_dir()):
            return cand
    raise FileNotFoundError(f"{raw}: no CHAOS case folders (expected Train_Sets/MR/<id>/T2SPIR/)")


def _find_chaos_cases(raw: Path) -> list:
    root = _chaos_root(raw)
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / "T2SPIR").is_dir()),
                  key=lambda d: int(d.name))
    return [(int(d.name), (d,)) for d in dirs]


def _find_cmr_cases(raw: Path) -> list:
    out = []
    for f in sorted(raw.rglob("patient*_C0.nii.gz"), key=lambda p: _natural_key(p.name)):
        m = re.match(r"^patient(\d+)_C0\.nii\.gz$", f.name)
        if not m:
            continue
        lab = f.with_name(f"patient{m.group(1)}_C0_manual.nii.gz")
        if not lab.is_file():
            raise FileNotFoundError(f"{lab}: label file missing for {f.name}")
        out.append((int(m.group(1)), (f, lab)))
    if not out:
        raise FileNotFoundError(f"{raw}: no patient<id>_C0.nii.gz files found")
    return out


def _find_sabs_cases(raw: Path) -> list:
    imgs = sorted((raw / "img").glob("img*.nii.gz"), key=lambda p: _natural_key(p.name)) if (raw / "img").is_dir() else []
    if not imgs:
        raise FileNotFoundError(f"{raw / 'img'}: no img<NNNN>.nii.gz files found")
    out = []
    for pos, f in enumerate(imgs):
        num = re.match(r"^img(\d+)\.nii\.gz$", f.name)
        if not num:
            raise ValueError(f"{f}: unexpected file name, expected img<NNNN>.nii.gz")
        lab = raw / "label" / f"label{num.group(1)}.nii.gz"
        if not lab.is_file():
            raise FileNotFoundError(f"{lab}: label file missing for {f.name}")
        out.append((pos, (f, lab)))
    return out


class RawLayout(NamedTuple):
    """How to pre-process one raw layout.

    Attributes:
        find: ``find(raw_dir) -> [(output id, input paths), ...]`` (the ids in the module docstring).
        convert: ``convert(input paths, spec, size_rule) -> (image, label)`` ``SimpleITK.Image`` pair.
    """

    find: Callable[[Path], list]
    convert: Callable[[tuple, DatasetSpec, str], tuple]


#: ``DatasetSpec.raw_layout`` -> its finder and converter.
RAW_LAYOUTS = {
    "chaos_dicom_png": RawLayout(
        _find_chaos_cases, lambda paths, spec, rule: preprocess_chaos_case(paths[0], spec, size_rule=rule)),
    "cmr_nifti": RawLayout(
        _find_cmr_cases, lambda paths, spec, rule: preprocess_cmr_case(paths[0], paths[1], spec, size_rule=rule)),
    "sabs_nifti": RawLayout(
        _find_sabs_cases, lambda paths, spec, rule: preprocess_sabs_case(paths[0], paths[1], spec, size_rule=rule)),
}


def _raw_layout(spec: DatasetSpec) -> RawLayout:
    if spec.raw_layout is None:
        raise ValueError(f"{spec.name}: no raw pre-processing (valid: {', '.join(raw_dataset_names())})")
    return RAW_LAYOUTS[spec.raw_layout]


def find_cases(dataset: str, raw_dir: PathLike) -> list:
    """List the raw cases of a data set.

    Returns:
        List of (output id, tuple of input paths): CHAOST2 (case_dir,), CMR/SABS (image_file, label_file).

    Raises:
        FileNotFoundError: ``raw_dir`` missing, or no case (or a case's label) in it.
        ValueError: The data set has no raw layout, or a file name breaks the layout.
    """
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: raw data folder not found")
    return _raw_layout(get_dataset_spec(dataset)).find(raw)


def preprocess_dataset(dataset: str, raw_dir: PathLike, out_dir: PathLike, ids: Optional[Sequence[int]] = None,
                       verbose: bool = True, size_rule: str = "public") -> list:
    """Pre-process every (or the selected) case of a raw data set into ``out_dir``.

    Args:
        dataset: A data set with a raw layout (``raw_dataset_names()``: CHAOST2, SABS, CMR).
        raw_dir: Raw folder (layouts in the module docstring).
        out_dir: Output folder (created).
        ids: Output ids to process (default all).
        verbose: Print one line per case.
        size_rule: Resampled size per axis, ``public`` or ``round`` (:func:`resampled_size`).

    Returns:
        Paths of the written image files.
    """
    from dataloaders.volume_io import image_path, label_path, write_nifti_like
    import SimpleITK as sitk

    spec = get_dataset_spec(dataset)
    cases = find_cases(spec.name, raw_dir)
    if ids is not None:
        wanted = {int(i) for i in ids}
        missing = wanted - {cid for cid, _ in cases}
        if missing:
            raise ValueError(f"{raw_dir}: ids {sorted(missing)} not found; available: {[c for c, _ in cases]}")
        cases = [c for c in cases if c[0] in wanted]
    out = Path(out_dir)
    written = []
    convert = _raw_layout(spec).convert
    for cid, paths in cases:
        img, lab = convert(paths, spec, size_rule)
        ipath = write_nifti_like(sitk.GetArrayFromImage(img).astype(np.float32), img, image_path(out, cid))
        write_nifti_like(sitk.GetArrayFromImage(lab), lab, label_path(out, cid))
        written.append(ipath)
        if verbose:
            print(f"{spec.name} {paths[0]} -> {ipath.name} shape {tuple(reversed(img.GetSize()))} "
                  f"spacing {tuple(round(s, 3) for s in reversed(img.GetSpacing()))}")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m dataloaders.preprocess",
                                description="Pre-process a raw public data set into image_<id>/label_<id> NIfTI files.")
    p.add_argument("--dataset", required=True, choices=raw_dataset_names())
    p.add_argument("--raw-dir", required=True, help="raw data folder (layout: see the module docstring)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--ids", type=int, nargs="*", default=None, help="only these output ids")
    p.add_argument("--resample-size", choices=RESAMPLE_SIZE_RULES, default="public",
                   help="resampled size per axis: public int(n*s/t + 1) (default) or round(n*s/t)")
    args = p.parse_args(argv)
    try:
        preprocess_dataset(args.dataset, args.raw_dir, args.out_dir, args.ids, size_rule=args.resample_size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
