"""Reading and writing pre-processed volumes (NIfTI, via SimpleITK).

On-disk layout of a data set folder (docs/protocol.md, "Data on disk")::

    <data_dir>/image_<id>.nii.gz
    <data_dir>/label_<id>.nii.gz
    <data_dir>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz

These names are built and listed by ``image_path``, ``label_path``, ``supervoxel_dir``, ``supervoxel_file``
and ``list_images``; the pre-processing, the synthetic data set, the supervoxel CLI and the config use them.

Arrays are (Z, H, W): slices along axis 0; spacing is (z, y, x) in mm. Every error is one line that names the
file and what was wrong.

SimpleITK is imported lazily (inside the functions): importing it costs about 100 MB of resident memory, which
``load_cases(..., num_workers>0)`` keeps out of the training process by reading in child processes.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from dataloaders.dataset_specifics import DatasetSpec
from util.atomic_files import atomic_path

__all__ = [
    "Case",
    "list_images",
    "list_case_ids",
    "image_path",
    "label_path",
    "supervoxel_dir",
    "supervoxel_file",
    "supervoxel_path",
    "read_nifti",
    "count_nonfinite_nifti",
    "read_header",
    "read_direction",
    "write_nifti_like",
    "zscore",
    "compact_labels",
    "load_case",
    "load_cases",
]

PathLike = Union[str, os.PathLike]
_IMAGE_RE = re.compile(r"^image_(.+)\.nii\.gz$")


@dataclass
class Case:
    """One loaded volume.

    Attributes:
        case_id: Numeric id from the file name.
        image: float32 [Z, H, W], z-scored per volume.
        label: uint8 [Z, H, W] training label ids, or None when not loaded.
        supervoxels: int32 [Z, H, W] (0 = background, 1..N body supervoxels; uint8/uint16 when loaded with
            ``compact=True``), or None.
        spacing: (z, y, x) in mm.
        image_path: Path of the image file.
    """

    case_id: int
    image: np.ndarray
    label: Optional[np.ndarray]
    supervoxels: Optional[np.ndarray]
    spacing: tuple
    image_path: Path

    @property
    def n_slices(self) -> int:
        """Number of slices Z."""
        return int(self.image.shape[0])


def image_path(data_dir: PathLike, case_id: int) -> Path:
    """Path of ``image_<id>.nii.gz``."""
    return Path(data_dir) / f"image_{int(case_id)}.nii.gz"


def label_path(data_dir: PathLike, case_id: int) -> Path:
    """Path of ``label_<id>.nii.gz``."""
    return Path(data_dir) / f"label_{int(case_id)}.nii.gz"


def supervoxel_dir(data_dir: PathLike, n_sv: int) -> Path:
    """Default folder of a data set's supervoxels: ``<data_dir>/supervoxels_<n_sv>``."""
    return Path(data_dir) / f"supervoxels_{int(n_sv)}"


def supervoxel_file(sv_dir: PathLike, case_id: Union[int, str]) -> Path:
    """Path of ``superpix-MIDDLE_<id>.nii.gz`` in a supervoxel folder.

    Args:
        sv_dir: The supervoxel folder.
        case_id: The id as it stands in the image's file name (``list_images`` gives strings such as
            ``"007"``, kept as they are), or an int.
    """
    return Path(sv_dir) / f"superpix-MIDDLE_{case_id}.nii.gz"


def supervoxel_path(data_dir: PathLike, case_id: int, n_sv: int) -> Path:
    """Path of ``supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz``."""
    return supervoxel_file(supervoxel_dir(data_dir, n_sv), int(case_id))


def _id_sort_key(case_id: str) -> tuple:
    # numeric ids in numeric order (2 before 10), then the others by name; isdecimal is what \d and int() take
    return (0, int(case_id), "") if case_id.isdecimal() else (1, 0, case_id)


def list_images(data_dir: PathLike) -> list[tuple[str, Path]]:
    """``(id, path)`` of every ``image_<id>.nii.gz`` file of a folder.

    Ids are strings as they stand in the file names (``"2"``, ``"007"``, ``"liver_a"``): numeric ones first,
    in numeric order, then the others by name. Entries that are not files are left out.

    Raises:
        FileNotFoundError: The folder does not exist.
    """
    found = []
    for path in Path(data_dir).iterdir():
        match = _IMAGE_RE.match(path.name)
        if match and path.is_file():
            found.append((match.group(1), path))
    return sorted(found, key=lambda item: _id_sort_key(item[0]))


def list_case_ids(data_dir: PathLike) -> list:
    """Numeric ids of the ``image_<id>.nii.gz`` files of a folder, sorted numerically (others are ignored).

    Raises:
        FileNotFoundError: The folder does not exist or holds no image_<id>.nii.gz file with a numeric id.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data folder not found")
    ids = [int(case_id) for case_id, _ in list_images(data_dir) if case_id.isdecimal()]
    if not ids:
        raise FileNotFoundError(f"{data_dir}: no image_<id>.nii.gz files in the data folder")
    return ids


_NIFTI_FLOAT_CODES = {16: "f4", 64: "f8"}  # NIfTI-1 datatype codes of float32 / float64
_CHUNK = 1 << 22


def count_nonfinite_nifti(path: PathLike) -> int:
    """Read a whole NIfTI-1 file: check it is complete, and count the NaN / infinite values it stores.

    SimpleITK reads a ``.nii.gz`` cut short without complaint (the missing slices come back as 0) and
    replaces stored NaN with 0, so the file is read here as well: the gzip stream must end with its
    trailer (length and CRC), and the data must be as long as the 348-byte header says.
    Files that are not single-file NIfTI-1 (``n+1``) are left to SimpleITK (0 is returned).

    Returns:
        Number of NaN or infinite values (always 0 for integer data types).

    Raises:
        ValueError: truncated or corrupt file; the message names the file.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
            if len(header) < 348:
                if len(header) == 0 or header[:4] in (struct.pack("<i", 348), struct.pack(">i", 348)):
                    raise ValueError(f"{path}: truncated file ({len(header)} bytes, a NIfTI header has 348)")
                return 0
            endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)
            if endian is None or header[344:347] != b"n+1":
                return 0
            code = struct.unpack(endian + "h", header[70:72])[0]
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            dims = struct.unpack(endian + "8h", header[40:56])
            n_values = int(np.prod(dims[1 : 1 + max(0, min(7, dims[0]))], dtype=np.int64))
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            handle.read(max(0, offset - 348))
            n_bytes = n_values * max(1, int(bitpix)) // 8
            n_bad, got = 0, 0
            dtype = np.dtype(endian + _NIFTI_FLOAT_CODES[code]) if code in _NIFTI_FLOAT_CODES else None
            step = _CHUNK - _CHUNK % 8  # whole values per chunk
            while got < n_bytes:
                block = handle.read(min(step, n_bytes - got))
                if not block:
                    break
                got += len(block)
                if dtype is not None:
                    data = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype=dtype)
                    n_bad += int(data.size - np.count_nonzero(np.isfinite(data)))
            if got < n_bytes:
                raise ValueError(f"{path}: truncated file: {got} of the {n_bytes} data bytes its header announces")
            while handle.read(_CHUNK):  # to the end, so gzip checks its length and CRC trailer
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read, corrupt or truncated file ({exc or type(exc).__name__})") from None
    return n_bad


def read_nifti(path: PathLike) -> tuple:
    """Read a 3-D volume with SimpleITK.

    Args:
        path: NIfTI file.

    Returns:
        (array [Z, H, W] in the file's pixel type, the ``SimpleITK.Image``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be read, is truncated or corrupt, stores NaN or infinite values (which
            SimpleITK would read as 0), or is not 3-D.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    n_bad = count_nonfinite_nifti(path)
    if n_bad:
        raise ValueError(f"{path}: {n_bad} NaN or infinite value(s) stored in the file")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ValueError(f"{path}: cannot read as an image ({first})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a 3-D scalar volume, got dimension {img.GetDimension()} with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return sitk.GetArrayFromImage(img), img


def read_header(path: PathLike):
    """The header of an image file (size, spacing, direction, ...) without reading its voxels.

    Returns:
        A ``SimpleITK.ImageFileReader`` with the image information read.

    Raises:
        ValueError: the file cannot be read as an image (the message names it).
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ValueError(f"{path}: cannot read as an image") from None
    return reader


def read_direction(path: PathLike) -> tuple:
    """The direction matrix (9 values, row-major, SimpleITK convention) of an image file, header only."""
    return tuple(read_header(path).GetDirection())


def write_nifti_like(array: np.ndarray, reference, path: PathLike) -> Path:
    """Write ``array`` [Z, H, W] with the geometry (spacing, origin, direction) of ``reference``, atomically.

    Args:
        array: Volume [Z, H, W]; its shape must equal the reference's (Z, H, W).
        reference: ``SimpleITK.Image`` whose geometry is copied.
        path: Output file (``.nii.gz``); written to a temporary file in the same folder, then renamed
            (``util.atomic_files.atomic_path``); its folder is created when missing.

    Returns:
        The output path.
    """
    import SimpleITK as sitk

    path = Path(path)
    ref_shape = tuple(reversed(reference.GetSize()))
    if tuple(array.shape) != ref_shape:
        raise ValueError(f"{path}: array shape {tuple(array.shape)} does not match reference shape {ref_shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.CopyInformation(reference)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return path


def zscore(image: np.ndarray, path: PathLike = "<array>") -> np.ndarray:
    """Per-volume z-score: (I - mean) / std, computed in float64, returned as float32.

    Raises:
        ValueError: The volume is constant (std 0); the message names ``path``.
    """
    img = np.asarray(image, dtype=np.float64)
    mean = img.mean()
    std = img.std()
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"{path}: image is constant (std {std}), cannot z-score")
    out = np.empty(img.shape, dtype=np.float32)
    np.subtract(img, mean, out=out, casting="unsafe")
    out /= np.float32(std)
    return out


def compact_labels(volume: np.ndarray) -> np.ndarray:
    """Cast a non-negative integer volume to the smallest unsigned dtype holding its values (uint8/16/32).

    No copy when it already has that dtype.
    """
    vmax = int(volume.max()) if volume.size else 0
    dtype = np.uint8 if vmax < 2**8 else np.uint16 if vmax < 2**16 else np.uint32
    return volume.astype(dtype, copy=False)


def _check_shape(array: np.ndarray, expected: tuple, path: Path, what: str, ref: Path) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"{path}: {what} shape {tuple(array.shape)} (Z,H,W) does not match image shape "
            f"{tuple(expected)} of {ref.name}"
        )


def _map_labels(raw: np.ndarray, spec: DatasetSpec, path: Path) -> np.ndarray:
    """Raw label array -> uint8 training ids; errors for non-integer or unknown values."""
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"{path}: label volume contains NaN or infinite values")
        if not np.array_equal(raw, np.round(raw)):
            raise ValueError(f"{path}: label volume contains non-integer values")
    values = np.unique(raw).astype(np.int64)
    mapping = spec.map_raw_labels(values, path)
    if all(k == v for k, v in mapping.items()):
        return raw.astype(np.uint8)
    out = np.zeros(raw.shape, dtype=np.uint8)
    for k, v in mapping.items():
        if k != 0:
            out[raw == k] = v
    return out


def load_case(
    data_dir: PathLike,
    case_id: int,
    spec: DatasetSpec,
    n_sv: Optional[int] = None,
    load_label: bool = True,
    sv_dir: Optional[PathLike] = None,
    compact: bool = False,
) -> Case:
    """Load one pre-processed volume with its label and supervoxels.

    Args:
        data_dir: Data set folder.
        case_id: Volume id.
        spec: Data set facts (label map, normalisation).
        n_sv: Read ``supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz`` when given.
        load_label: Read ``label_<id>.nii.gz`` (raw values mapped to training ids).
        sv_dir: Folder holding ``superpix-MIDDLE_<id>.nii.gz`` (default ``data_dir/supervoxels_<n_sv>``);
            used when ``n_sv`` is given.
        compact: Store the supervoxels in the smallest unsigned dtype holding their ids (uint8 below 256
            supervoxels) instead of int32: a quarter of the memory.

    Returns:
        A ``Case`` (image float32 z-scored [Z, H, W]).

    Raises:
        FileNotFoundError: A required file is missing.
        ValueError: Non-finite intensities, constant image, shape mismatch, unknown or non-integer labels,
            negative supervoxel ids.
    """
    ipath = image_path(data_dir, case_id)
    raw, img = read_nifti(ipath)
    n_bad = int(np.size(raw) - np.count_nonzero(np.isfinite(raw)))
    if n_bad:
        raise ValueError(f"{ipath}: image contains {n_bad} NaN or infinite value(s)")
    if spec.normalisation != "zscore":
        raise ValueError(f"{spec.name}: unsupported normalisation {spec.normalisation!r}; valid: zscore")
    image = zscore(raw, ipath)
    del raw
    shape = image.shape
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))

    label = None
    if load_label:
        lpath = label_path(data_dir, case_id)
        raw_lab, _ = read_nifti(lpath)
        _check_shape(raw_lab, shape, lpath, "label", ipath)
        label = _map_labels(raw_lab, spec, lpath)

    supervoxels = None
    if n_sv is not None:
        spath = supervoxel_file(supervoxel_dir(data_dir, n_sv) if sv_dir is None else sv_dir, int(case_id))
        sv, _ = read_nifti(spath)
        _check_shape(sv, shape, spath, "supervoxel", ipath)
        if sv.dtype.kind == "f":
            if not np.all(np.isfinite(sv)) or not np.array_equal(sv, np.round(sv)):
                raise ValueError(f"{spath}: supervoxel volume contains non-integer or non-finite values")
        if sv.size and sv.min() < 0:
            raise ValueError(f"{spath}: supervoxel ids must be >= 0, found {int(sv.min())}")
        supervoxels = compact_labels(sv) if compact else sv.astype(np.int32, copy=False)

    return Case(
        case_id=int(case_id),
        image=image,
        label=label,
        supervoxels=supervoxels,
        spacing=spacing,
        image_path=ipath,
    )


def _load_case_star(args: tuple) -> Case:
    return load_case(*args)


def load_cases(
    data_dir: PathLike,
    case_ids: Sequence[int],
    spec: DatasetSpec,
    n_sv: Optional[int] = None,
    load_label: bool = True,
    num_workers: int = 0,
    sv_dir: Optional[PathLike] = None,
    compact: bool = False,
) -> list:
    """Load several volumes, optionally reading them in child processes.

    Args:
        data_dir: Data set folder.
        case_ids: Volume ids, loaded in this order.
        spec: Data set facts.
        n_sv: Supervoxel folder to read (None: no supervoxels).
        load_label: Read the labels.
        num_workers: 0 reads in this process; > 0 reads with that many spawned processes (faster, and keeps
            SimpleITK and its decompression buffers out of this process's memory).
        sv_dir: Supervoxel folder override (see ``load_case``).
        compact: Compact supervoxel dtype (see ``load_case``).

    Returns:
        List of ``Case`` in the order of ``case_ids``.
    """
    jobs = [(data_dir, int(cid), spec, n_sv, load_label, sv_dir, compact) for cid in case_ids]
    if num_workers <= 0 or len(jobs) <= 1:
        return [load_case(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(_load_case_star, jobs))
