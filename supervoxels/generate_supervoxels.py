"""Generate 3-D Felzenszwalb supervoxel pseudo-labels for a data set folder (docs/protocol.md, "Supervoxels").

Usage::

    python supervoxels/generate_supervoxels.py --data-dir DIR [--dataset NAME] [--n-sv N] [--out-dir OUT]
        [--workers N] [--fg-thresh 10] [--overwrite]
    python -m supervoxels.generate_supervoxels --data-dir DIR ...

For every ``DIR/image_<id>.nii.gz`` this writes ``OUT/superpix-MIDDLE_<id>.nii.gz`` (default
``OUT = DIR/supervoxels_<n_sv>``): an int32 volume with the image's geometry where 0 is background
(outside the per-slice body mask) and the body's supervoxels are numbered 1..N consecutively.
Existing outputs are skipped unless ``--overwrite``; outputs are written atomically.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run as a script path (python supervoxels/generate_supervoxels.py): import the package module, adding
    # the repository root (the parent of this file's folder) to sys.path only when it is not importable.
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("supervoxels") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from supervoxels.generate_supervoxels import main

    sys.exit(main())

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from dataloaders.volume_io import list_images, read_nifti, supervoxel_dir, supervoxel_file, write_nifti_like
from supervoxels.felzenszwalb import felzenszwalb_3d
from util.atomic_files import stale_temporaries

_STRUCT_2D_8 = np.ones((3, 3), dtype=bool)


def rescale_to_255(image: np.ndarray) -> np.ndarray:
    """Rescale intensities linearly to [0, 255]: ``255 * (I - min) / (max - min)`` (float64).

    Args:
        image: real array of any shape, finite.

    Returns:
        float64 array of the same shape; all zeros when the image is constant.
    """
    img = np.asarray(image, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.float64)
    return 255.0 * (img - lo) / (hi - lo)


def body_mask(image255: np.ndarray, fg_thresh: float = 10.0) -> np.ndarray:
    """Per-slice body mask: ``image > fg_thresh``, largest 8-connected component, holes filled.

    Args:
        image255: [Z, H, W] image rescaled to [0, 255] (slices along axis 0).
        fg_thresh: intensity threshold on the 0-255 scale.

    Returns:
        bool [Z, H, W]; slices without any voxel above the threshold are all False. When several
        components tie for the largest, the first in raster order is kept.
    """
    above = image255 > fg_thresh
    mask = np.zeros(above.shape, dtype=bool)
    for z in range(above.shape[0]):
        if not above[z].any():
            continue
        cc, n = ndimage.label(above[z], structure=_STRUCT_2D_8)
        if n > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            largest = cc == int(np.argmax(sizes))
        else:
            largest = cc == 1
        mask[z] = ndimage.binary_fill_holes(largest)
    return mask


def supervoxelize_volume(
    image: np.ndarray,
    spacing: Sequence[float],
    n_sv: int,
    fg_thresh: float = 10.0,
    scale: float = 1.0,
    sigma: float = 0.0,
) -> np.ndarray:
    """Supervoxels of one volume as the CLI writes them.

    Rescales the image to [0, 255], runs :func:`supervoxels.felzenszwalb.felzenszwalb_3d` with
    ``min_size = n_sv`` and the given spacing, then applies the per-slice body mask.

    Args:
        image: real array [Z, H, W], finite.
        spacing: voxel spacing (z, y, x) in mm.
        n_sv: minimum supervoxel size in voxels (``min_size``), >= 1.
        fg_thresh: body-mask threshold on the 0-255 scale.
        scale: Felzenszwalb scale (merge constant ``k = scale / 255``).
        sigma: optional Gaussian pre-smoothing in mm (0 = none).

    Returns:
        int32 [Z, H, W]: 0 outside the body mask, the body's supervoxels numbered 1..N consecutively
        (in order of their first voxel in raster order). A supervoxel cut by the mask keeps one label.

    Raises:
        ValueError: invalid image, spacing or parameters (see ``felzenszwalb_3d``).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"image must be a non-empty 3-D array [Z, H, W], got shape {image.shape}")
    if not np.isfinite(fg_thresh):
        raise ValueError(f"fg_thresh must be finite, got {fg_thresh!r}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    image255 = rescale_to_255(image)
    mask = body_mask(image255, fg_thresh)
    if sigma == 0:
        # the engine works in float32 anyway; drop the float64 copy before it allocates its graph
        image255 = image255.astype(np.float32)
    labels = felzenszwalb_3d(image255, spacing, scale=scale, min_size=n_sv, sigma=sigma)
    del image255
    present = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    present[labels[mask]] = 1
    new_ids = np.cumsum(present, dtype=np.int32) * present  # old label -> 1..N, absent -> 0
    out = new_ids[labels]
    out[~mask] = 0
    return out


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # SimpleITK puts the useful part ("... does not exist", "Unable to determine ImageIO ...") last.
    text = lines[-1].replace("sitk::ERROR: ", "") if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete half-written outputs left by a killed earlier run (their writer is gone); returns the count."""
    stale = stale_temporaries(out_dir, supervoxel_file(out_dir, "*").name)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: on Linux, ask the kernel to end this worker when the parent process dies.

    Without it, a killed CLI leaves its workers running (and holding their memory) as orphans.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C still reaches the workers (same process group)
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class Result:
    """Outcome of one volume."""

    case_id: str
    image_path: Path
    status: str  # "done", "skipped" or "error"
    n_supervoxels: Optional[int] = None
    seconds: float = 0.0
    message: str = ""
    warning: str = ""


def process_case(
    case_id: str,
    image_path: Path,
    out_dir: Path,
    n_sv: int,
    fg_thresh: float,
    overwrite: bool,
) -> Result:
    """Read one image, compute its supervoxels and write them; never raises (errors go in the result)."""
    start = time.perf_counter()
    target = supervoxel_file(out_dir, case_id)
    if target.exists() and not overwrite:
        return Result(case_id, image_path, "skipped")
    try:
        # complete-or-fail read: SimpleITK alone accepts a .nii.gz cut short and reads stored NaN as 0
        array, image = read_nifti(image_path)  # [Z, H, W]
        spacing = tuple(float(v) for v in reversed(image.GetSpacing()))  # (z, y, x)
        labels = supervoxelize_volume(array, spacing, n_sv, fg_thresh)
        del array
        n = int(labels.max())
        warning = ""
        if n == 0:
            warning = f"{image_path}: no foreground above --fg-thresh {fg_thresh:g}; wrote an all-background volume"
        write_nifti_like(labels, image, target)  # atomic: a killed run leaves no truncated output
    except Exception as exc:  # noqa: BLE001 - reported per file, the run goes on
        message = str(exc) if isinstance(exc, ValueError) else _one_line(exc)
        message = message.removeprefix(f"{image_path}: ")
        return Result(case_id, image_path, "error", message=message.splitlines()[0] if message else "error")
    return Result(case_id, image_path, "done", n, time.perf_counter() - start, warning=warning)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


#: ``--n-sv`` without ``--dataset``: the abdominal data sets' size, the CLI's default before ``--dataset``.
FALLBACK_N_SV = 5000


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments; ``--dataset`` choices and ``--n-sv`` defaults come from the data-set registry."""
    from dataloaders.dataset_specifics import DATASETS  # the CLI's concern only: supervoxelizing needs no registry

    sizes = ", ".join(f"{name} {spec.n_sv}" for name, spec in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog="generate_supervoxels",
        description="Generate 3-D Felzenszwalb supervoxels (superpix-MIDDLE_<id>.nii.gz) for every "
        "image_<id>.nii.gz in a data set folder.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with image_<id>.nii.gz files")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default=None,
                        help="registry data set of the folder: its supervoxel size is the default of --n-sv")
    parser.add_argument("--n-sv", type=int, default=None,
                        help=f"minimum supervoxel size in voxels (default: the --dataset's, {sizes}; "
                        f"{FALLBACK_N_SV} without --dataset)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output folder (default: DATA_DIR/supervoxels_<n_sv>)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel worker processes (default: min(4, CPU count))")
    parser.add_argument("--fg-thresh", type=float, default=10.0,
                        help="body-mask threshold on the 0-255 rescaled image (default 10)")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _error(message: str) -> int:
    print(f"generate_supervoxels: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 some volumes failed, 2 usage / input error)."""
    from dataloaders.dataset_specifics import get_dataset_spec

    args = build_parser().parse_args(argv)
    if args.n_sv is None:
        args.n_sv = get_dataset_spec(args.dataset).n_sv if args.dataset else FALLBACK_N_SV
    data_dir: Path = args.data_dir
    if args.n_sv < 1:
        return _error(f"--n-sv must be >= 1, got {args.n_sv}")
    if args.workers < 1:
        return _error(f"--workers must be >= 1, got {args.workers}")
    if not np.isfinite(args.fg_thresh):
        return _error(f"--fg-thresh must be finite, got {args.fg_thresh}")
    if not data_dir.is_dir():
        return _error(f"data directory {data_dir} does not exist or is not a directory")
    cases = list_images(data_dir)
    if not cases:
        return _error(f"no image_<id>.nii.gz files in {data_dir}")
    out_dir: Path = args.out_dir if args.out_dir is not None else supervoxel_dir(data_dir, args.n_sv)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _error(f"cannot create output directory {out_dir}: {exc.strerror or exc}")

    n_stale = remove_stale_temporaries(out_dir)
    if n_stale:
        print(f"generate_supervoxels: removed {n_stale} half-written file(s) of an interrupted run in {out_dir}",
              file=sys.stderr)

    start = time.perf_counter()
    jobs = [(cid, path, out_dir, args.n_sv, args.fg_thresh, args.overwrite) for cid, path in cases]
    results = run_jobs(jobs, args.workers, show_progress=not args.no_progress)
    print(summary_line(results, time.perf_counter() - start, out_dir))
    return 1 if any(r.status == "error" for r in results) else 0


def run_jobs(jobs: list[tuple], workers: int, show_progress: bool = True) -> list[Result]:
    """:func:`process_case` on every job, in ``workers`` processes (1: this one); errors and warnings are
    printed as they come."""
    from tqdm import tqdm

    results: list[Result] = []
    progress = tqdm(total=len(jobs), unit="vol", desc="supervoxels", disable=None if show_progress else True)

    def report(result: Result) -> None:
        results.append(result)
        if result.status == "error":
            progress.write(f"generate_supervoxels: error: {result.image_path}: {result.message}", file=sys.stderr)
        elif result.warning:
            progress.write(f"generate_supervoxels: warning: {result.warning}", file=sys.stderr)
        progress.update(1)

    workers = min(workers, len(jobs))
    if workers == 1:
        for job in jobs:
            report(process_case(*job))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(process_case, *job) for job in jobs]
            for future in as_completed(futures):
                report(future.result())
    progress.close()
    return results


def summary_line(results: Sequence[Result], elapsed: float, out_dir: Path) -> str:
    """Volumes written, skipped and failed, the spread of supervoxel counts, and the time (s)."""
    done = [r for r in results if r.status == "done"]
    skipped = sum(r.status == "skipped" for r in results)
    failed = sum(r.status == "error" for r in results)
    counts = [r.n_supervoxels for r in done]
    if counts:
        spread = f"supervoxels per volume min/median/max {min(counts)}/{statistics.median(counts):g}/{max(counts)}"
    else:
        spread = "supervoxels per volume -"
    return (f"{len(done)} volumes written, {skipped} skipped (exist), {failed} failed; {spread}; "
            f"{elapsed:.1f} s -> {out_dir}")

if __name__ == "__main__":
    sys.exit(main())
