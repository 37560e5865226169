"""Segment your own scans from one annotated example, with a trained checkpoint.

    python predict.py --checkpoint CKPT --support-image S.nii.gz --support-label S_label.nii.gz \\
        --labels 1 3 --query Q1.nii.gz [Q2.nii.gz ...] [--query-dir DIR] --out-dir OUT \\
        [--device auto] [--amp auto] [--modality mr|ct] [--query-range Z0 Z1] [--save-probs]

A DICOM series folder is accepted wherever a NIfTI file is. Scans may have any spacing, orientation and
size: they are brought into the checkpoint's training layout and the result is mapped back onto each
query's own grid (``inference/model_space.py``); slices are matched as in EP1 (``inference/predict.py``).

Writes, per query ``<name>`` (file name without ``.nii.gz``, or the DICOM folder's name):
``OUT/<name>_seg.nii.gz`` (the query's size, spacing, origin and direction; label values as given),
``OUT/<name>_seg.json`` (steps, the organ's slice range per label and whether it was given or estimated,
voxel counts, the git commit and the checkpoint's step and SHA-256), ``OUT/<name>_overlays/z<k>.png``
(radiological convention) and with ``--save-probs`` ``OUT/<name>_prob_<label>.nii.gz``. Bad input stops with one line naming the file, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evaluation.provenance import code_record
from inference.model_space import (MODALITIES, check_same_geometry, check_scan, read_scan, to_model_space)
from inference.predict import AMP_MODES, load_predictor, predict_query
from util.atomic_files import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python predict.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (e.g. .../snapshots/final.pth)")
    p.add_argument("--support-image", required=True, type=Path, help="the annotated example (NIfTI or DICOM folder)")
    p.add_argument("--support-label", required=True, type=Path, help="its label map, on the same grid")
    p.add_argument("--labels", required=True, type=int, nargs="+", help="label values of the support to segment")
    p.add_argument("--query", type=Path, nargs="*", default=[], help="scans to segment")
    p.add_argument("--query-dir", type=Path, help="also segment every *.nii / *.nii.gz file and sub-folder "
                                                  "(a DICOM series) of this folder")
    p.add_argument("--out-dir", required=True, type=Path, help="output folder (created)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", help="auto (bf16 where the device computes it natively, else fp32), "
                                                 "off (fp32) or bf16")
    p.add_argument("--modality", help="mr or ct: the scans' intensity rule (default: the checkpoint's data set's)")
    p.add_argument("--query-range", type=int, nargs=2, action="append", metavar=("Z0", "Z1"),
                   help="the organ's first and last slice in the query (0-based indices of its third axis); "
                        "once for all labels or once per label, one query only; default: estimated")
    p.add_argument("--save-probs", action="store_true", help="also write the probability map of every label")
    p.add_argument("--overlays", type=int, default=3, help="PNG pictures per query (default 3; 0: none)")
    p.add_argument("--batch", type=int, default=None, help="query slices per forward (default 16 CUDA, 1 CPU)")
    return p


def query_name(path: Path) -> str:
    """Output stem of a query: the file name without .nii(.gz), or the DICOM folder's name."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_queries(queries: Sequence[Path], query_dir: Optional[Path]) -> list[Path]:
    """The query scans in command-line order, then those of ``query_dir`` sorted by name."""
    found = list(queries)
    if query_dir is not None:
        if not query_dir.is_dir():
            raise FileNotFoundError(f"{query_dir}: --query-dir folder not found")
        found += sorted(p for p in query_dir.iterdir()
                        if p.is_dir() or p.name.endswith((".nii", ".nii.gz")))
    if not found:
        raise ValueError("no query scan: give --query and/or --query-dir")
    names: dict[str, Path] = {}
    for path in found:
        other = names.setdefault(query_name(path), path)
        if other != path:
            raise ValueError(f"{path}: same output name {query_name(path)!r} as {other}")
    return found


def _save_overlays(folder: Path, image: np.ndarray, seg: np.ndarray, direction: tuple, n: int) -> list[Path]:
    from util.visualisation import save_overlay

    slices = np.flatnonzero(seg.reshape(seg.shape[0], -1).any(axis=1))
    if n <= 0 or slices.size == 0:
        return []
    picks = np.unique(slices[np.linspace(0, len(slices) - 1, n).round().astype(int)])
    empty = np.zeros(seg.shape[1:], np.uint8)
    return [save_overlay(folder / f"z{z:03d}.png", image[z], empty, seg[z] > 0, direction=direction) for z in picks]


def _check_arguments(args: argparse.Namespace) -> tuple[list[Path], Optional[list], Optional[str]]:
    """Everything that can be checked without reading volumes; returns (queries, per-label ranges, modality)."""
    modality = args.modality.lower() if args.modality else None
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"--modality: unknown modality {args.modality!r}; expected one of {', '.join(MODALITIES)}")
    if args.amp not in AMP_MODES:
        raise ValueError(f"--amp: unknown mode {args.amp!r}; expected one of {', '.join(AMP_MODES)}")
    labels = args.labels
    if len(set(labels)) != len(labels) or min(labels) < 1 or max(labels) > 65535:
        raise ValueError(f"--labels: expected distinct values in 1..65535, got {labels}")
    queries = collect_queries(args.query, args.query_dir)
    ranges = None
    if args.query_range:
        if len(queries) != 1:
            raise ValueError(f"--query-range: applies to one query, got {len(queries)}")
        if len(args.query_range) not in (1, len(labels)):
            raise ValueError(f"--query-range: give it once, or once per label ({len(labels)}), "
                             f"got {len(args.query_range)}")
        ranges = [tuple(r) for r in args.query_range] * (len(labels) if len(args.query_range) == 1 else 1)
    for path in [args.support_image, args.support_label, *queries]:
        size = check_scan(path)
        for z0, z1 in ranges or []:
            if path == queries[0] and size is not None and not 0 <= z0 <= z1 < size[2]:
                raise ValueError(f"{path}: slice range {z0} {z1} is not within 0..{size[2] - 1} (first <= last)")
    return queries, ranges, modality


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    from tqdm import tqdm

    from dataloaders.volume_io import write_nifti_like

    queries, ranges, modality = _check_arguments(args)
    predictor = load_predictor(args.checkpoint, args.device, args.amp, args.batch)
    spec = predictor.spec
    trained = spec.modality.lower()
    modality = modality or trained
    if modality != trained:
        print(f"warning: {args.checkpoint} was trained on {trained.upper()} ({spec.name}); segmenting "
              f"{modality.upper()} scans", file=sys.stderr)

    support_image = read_scan(args.support_image)
    support_label = read_scan(args.support_label, label=True)
    check_same_geometry(support_image, support_label, args.support_label)
    values = sitk.GetArrayFromImage(support_label)
    present = np.unique(values)
    missing = [lab for lab in args.labels if lab not in present]
    if missing:
        shown = ", ".join(str(v) for v in present[:20]) + (", ..." if len(present) > 20 else "")
        raise ValueError(f"{args.support_label}: no voxel with label {', '.join(map(str, missing))} "
                         f"(values present: {shown})")
    wanted = sitk.GetImageFromArray(np.where(np.isin(values, args.labels), values, 0).astype(np.int32))
    wanted.CopyInformation(support_label)
    support = to_model_space(support_image, spec, modality, wanted, name=str(args.support_image))
    del values, wanted, support_label

    provenance = {"code": code_record(Path(__file__).resolve().parent), "checkpoint": predictor.checkpoint}
    print(f"checkpoint {args.checkpoint}: {spec.name}, {predictor.device}, "
          f"{'fp32' if predictor.amp == 'off' else predictor.amp}, modality {modality}", file=sys.stderr)
    for path in queries:
        name = query_name(path)
        image = read_scan(path)
        scan = to_model_space(image, spec, modality, name=str(path))
        with tqdm(total=0, desc=name, unit="slice", leave=False, dynamic_ncols=True) as bar:
            result = predict_query(predictor, support, scan, args.labels, ranges, name=str(path), progress=bar)
        seg_path = write_nifti_like(result["segmentation"], image, args.out_dir / f"{name}_seg.nii.gz")
        if args.save_probs:
            for label, prob in result["probabilities"].items():
                write_nifti_like(prob, image, args.out_dir / f"{name}_prob_{label}.nii.gz")
        _save_overlays(args.out_dir / f"{name}_overlays", sitk.GetArrayViewFromImage(image),
                       result["segmentation"], image.GetDirection(), args.overlays)
        atomic_write_text(args.out_dir / f"{name}_seg.json", json.dumps({
            "query": str(path), "segmentation": str(seg_path), "checkpoint": str(args.checkpoint),
            "support_image": str(args.support_image), "support_label": str(args.support_label),
            "modality": modality, "labels": {str(k): v for k, v in result["labels"].items()},
            "query_steps": scan.steps, "support_steps": support.steps, "seconds": round(result["seconds"], 2),
            "provenance": provenance}, indent=2))
        parts = []
        for label, info in result["labels"].items():
            where = (f"slices {info['slice_range'][0]}-{info['slice_range'][1]} ({info['source']})"
                     if info["slice_range"] else info["source"])
            parts.append(f"label {label}: {info['voxels']} voxels, {where}")
        size = "x".join(str(s) for s in image.GetSize())
        spacing = "x".join(f"{s:.3g}" for s in image.GetSpacing())
        print(f"{name}: {size} voxels at {spacing} mm; {'; '.join(parts)}; {result['seconds']:.1f} s -> {seg_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 2 with one ``error:`` line on bad input."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
