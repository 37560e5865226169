"""Segment new scans from one annotated example: checkpoint loading, EP1 slice correspondence, label fusion.

For each requested label the support scan's annotated slices and the query's organ extent are matched as
in EP1 (:func:`dataloaders.ep1.chunk_plan`): the extent is cut into ``n_parts`` chunks and chunk
k is segmented with the support slice at fraction (2k + 1) / (2 n_parts) of the support's labelled slices.

The query's extent is either given (a slice range) or estimated: a first pass segments every query slice
with the support's middle labelled slice; the extent is the longest-by-area run of consecutive slices whose
predicted foreground covers at least ``EXTENT_MIN_FRACTION`` of that support slice's foreground. Slices
outside the extent are background.

Several labels go into one map: each label's probability is mapped back to the query's grid, and a voxel
takes the label of highest probability among those above 0.5.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dataloaders.dataset_specifics import DatasetSpec, get_dataset_spec
from dataloaders.resize import resize_images, resize_masks, resize_probabilities
from dataloaders.ep1 import chunk_plan, labelled_slices, support_slice_indices
from evaluation.provenance import checkpoint_record
from inference.model_space import ModelSpaceScan, model_slice_range, original_slice_range, to_original_grid
from models.fewshot import FewShotSeg
from util.amp import AmpUnsupported, autocast, resolve_amp
from util.checkpoints import load_checkpoint, select_weights
from util.distributed import select_device

__all__ = [
    "AMP_MODES",
    "EXTENT_MIN_FRACTION",
    "Predictor",
    "LabelResult",
    "load_predictor",
    "segment_label",
    "fuse_labels",
    "predict_query",
]

AMP_MODES = ("auto", "off", "bf16")  # the precisions offered by ``predict.py --amp`` (util.amp resolves them)
EXTENT_MIN_FRACTION = 0.1


@dataclass
class Predictor:
    """A model ready to segment, with the facts of its training.

    Attributes:
        model: Anything with FewShotSeg's ``encode_support`` / ``segment`` (eval mode).
        spec: The training data set (pre-processing, modality).
        device: Where the model runs.
        amp: Resolved precision (``util.amp.resolve_amp``): ``"off"`` or ``"bf16"``.
        image_size: Square size the model runs at (the config's ``image_size``), or None for the data size.
        n_parts: Support slices / query chunks (the config's ``n_part``).
        batch: Query slices per forward.
        checkpoint: What was loaded (``evaluation.provenance.checkpoint_record``: path, step, SHA-256,
            which weights); empty for a model not read from a file.
    """

    model: Any
    spec: DatasetSpec
    device: torch.device
    amp: str = "off"
    image_size: Optional[int] = None
    n_parts: int = 3
    batch: int = 1
    checkpoint: dict = field(default_factory=dict)


@dataclass
class LabelResult:
    """One label of one query, in model space.

    Attributes:
        label: The label value.
        prob: float32 [Z, H, W] foreground probability (0 outside the extent).
        extent: (first, last) model-space slices segmented, or None when none was found.
        source: ``"given"``, ``"estimated"`` or ``"not found"``.
        support_slices: The support slices used, one per chunk.
    """

    label: int
    prob: np.ndarray
    extent: Optional[tuple]
    source: str
    support_slices: list = field(default_factory=list)


def load_predictor(checkpoint: str | Path, device: str = "auto", amp: str = "auto",
                   batch: Optional[int] = None) -> Predictor:
    """Build the model a training checkpoint describes (its stored ``config``) and load its weights.

    Raises:
        FileNotFoundError, ValueError: one line naming the checkpoint: unreadable, no training config,
            unknown data set or backbone, or weights that do not fit the configured model.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path)
    cfg = state.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "dataset" not in cfg:
        raise ValueError(f"{path}: no training config in the checkpoint (expected a file written by training.py)")
    try:
        spec = get_dataset_spec(cfg["dataset"])
    except ValueError as exc:
        raise ValueError(f"{path}: the checkpoint's config does not describe a model: {exc}") from None
    # the averaged weights when training kept them (what test.py evaluates by default)
    weights, which = select_weights(state, "auto", path)
    model = FewShotSeg.from_checkpoint(cfg["model"], path, weights)
    record = checkpoint_record(path, state, weights=which)
    del state, weights
    try:
        dev = select_device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if amp not in AMP_MODES:
        raise ValueError(f"--amp: unknown mode {amp!r}; expected one of {', '.join(AMP_MODES)}")
    try:
        precision = resolve_amp(amp, dev)
    except AmpUnsupported as exc:
        raise ValueError(str(exc).replace("config key 'amp'", "--amp")) from None
    model.to(dev).eval()
    image_size = cfg.get("image_size") or None
    return Predictor(model=model, spec=spec, device=dev, amp=precision,
                     image_size=int(image_size) if image_size else None, n_parts=int(cfg.get("n_part", 3)),
                     batch=int(batch or (16 if dev.type == "cuda" else 1)), checkpoint=record)


def _three(slices: torch.Tensor) -> torch.Tensor:
    """[N, H, W] -> [N, 3, H, W] (the grey image on every colour channel, as in training)."""
    return slices[:, None].expand(-1, 3, -1, -1)


@torch.inference_mode()
def _segment_slices(predictor: Predictor, support_image: np.ndarray, support_mask: np.ndarray,
                    query_images: np.ndarray, progress: Optional[Any] = None) -> np.ndarray:
    """Foreground probability [N, H, W] of query slices [N, H, W] against one support slice [H, W]."""
    dev, size = predictor.device, predictor.image_size
    grid = tuple(support_image.shape)
    image = torch.as_tensor(np.ascontiguousarray(support_image[None]), dtype=torch.float32)
    mask = torch.as_tensor(np.ascontiguousarray(support_mask[None]), dtype=torch.float32)
    if size:
        image, mask = resize_images(image, size), resize_masks(mask, size)
    out = np.zeros((len(query_images), *grid), np.float32)
    with autocast(dev, predictor.amp):
        encoding = predictor.model.encode_support(_three(image).to(dev), mask.to(dev))
        for start in range(0, len(query_images), predictor.batch):
            batch = torch.as_tensor(np.ascontiguousarray(query_images[start:start + predictor.batch]),
                                    dtype=torch.float32)
            if size:
                batch = resize_images(batch, size)
            prob, _ = predictor.model.segment(encoding, _three(batch).to(dev))
            prob = prob[:, 1].float().cpu()
            out[start:start + len(batch)] = (resize_probabilities(prob, grid) if size else prob).numpy()
            if progress is not None:
                progress.update(len(batch))
    return out


def _estimate_extent(predictor: Predictor, support: ModelSpaceScan, mask: np.ndarray, sup_slices: np.ndarray,
                     query: ModelSpaceScan, progress: Optional[Any]) -> Optional[tuple]:
    middle = int(sup_slices[support_slice_indices(len(sup_slices), 1)[0]])
    prob = _segment_slices(predictor, support.image[middle], mask[middle], query.image, progress)
    area = (prob > 0.5).reshape(len(prob), -1).sum(axis=1)
    keep = area >= EXTENT_MIN_FRACTION * mask[middle].sum()
    best, best_area, start = None, 0, None
    for z in range(len(keep) + 1):
        if z < len(keep) and keep[z]:
            start = z if start is None else start
        elif start is not None:
            run_area = int(area[start:z].sum())
            if run_area > best_area:
                best, best_area = (start, z - 1), run_area
            start = None
    return best


def segment_label(predictor: Predictor, support: ModelSpaceScan, query: ModelSpaceScan, label: int,
                  extent: Optional[tuple] = None, progress: Optional[Any] = None) -> LabelResult:
    """Segment one label of a query in model space.

    Args:
        predictor: From :func:`load_predictor` (or any model with the same interface).
        support: Support scan with its label (model space).
        query: Query scan (model space).
        label: Label value in the support's label map.
        extent: (first, last) model-space query slices holding the organ; None estimates it.
        progress: Optional object with ``update(n)`` (a tqdm bar) and ``total``.

    Returns:
        A :class:`LabelResult`.
    """
    mask = (support.label == label).astype(np.float32)
    sup_slices = labelled_slices(support.label, label)
    if sup_slices.size == 0:
        raise ValueError(f"support label: value {label} has no voxel on the model grid (organ too small?)")
    source = "given"
    if extent is None:
        if progress is not None:
            progress.total += len(query.image)
            progress.refresh()
        extent = _estimate_extent(predictor, support, mask, sup_slices, query, progress)
        source = "estimated" if extent is not None else "not found"
    prob = np.zeros(query.image.shape, np.float32)
    if extent is None:
        return LabelResult(label, prob, None, source)
    plan = chunk_plan(sup_slices, np.arange(extent[0], extent[1] + 1), predictor.n_parts)
    if progress is not None:
        progress.total += extent[1] - extent[0] + 1
        progress.refresh()
    for zs, q in plan:
        if q:
            prob[q] = _segment_slices(predictor, support.image[zs], mask[zs], query.image[q], progress)
    return LabelResult(label, prob, tuple(extent), source, [zs for zs, _ in plan])


def fuse_labels(probs: Sequence[np.ndarray], labels: Sequence[int]) -> np.ndarray:
    """One label map from per-label probabilities [Z, H, W]: the most probable label above 0.5, else 0.

    Returns:
        uint8 map (uint16 when a label exceeds 255); ties go to the label listed first.
    """
    dtype = np.uint8 if max(labels) < 256 else np.uint16
    stack = np.stack([np.asarray(p, np.float32) for p in probs])
    best = stack.argmax(axis=0)
    values = np.asarray(labels, dtype=dtype)[best]
    return np.where(stack.max(axis=0) > 0.5, values, 0).astype(dtype)


def predict_query(predictor: Predictor, support: ModelSpaceScan, query: ModelSpaceScan, labels: Sequence[int],
                  slice_ranges: Optional[Sequence[Optional[tuple]]] = None, name: str = "<query>",
                  progress: Optional[Any] = None) -> dict[str, Any]:
    """Segment ``labels`` in one query and map the result onto the query's own grid.

    Args:
        predictor, support, query: As :func:`segment_label`.
        labels: Label values of the support's map.
        slice_ranges: Per label, the organ's (first, last) slice in the query's own indices (third axis,
            inclusive), or None to estimate it.
        name: Query name for messages.
        progress: Optional tqdm-like bar.

    Returns:
        ``segmentation`` (array on the query's grid), ``probabilities`` {label: float32 array on the query's
        grid}, ``labels`` {label: {"voxels", "source", "slice_range", "model_slices", "support_slices"}},
        ``seconds``.
    """
    start = time.perf_counter()
    ranges = list(slice_ranges) if slice_ranges is not None else [None] * len(labels)
    probs, info = {}, {}
    for label, rng in zip(labels, ranges):
        extent = model_slice_range(query, rng[0], rng[1], name) if rng is not None else None
        res = segment_label(predictor, support, query, label, extent, progress)
        probs[label] = to_original_grid(res.prob, query)
        info[label] = {
            "source": res.source,
            "slice_range": (list(rng) if rng is not None else
                            list(original_slice_range(query, *res.extent) or []) if res.extent else None),
            "model_slices": list(res.extent) if res.extent else None,
            "support_slices": res.support_slices,
        }
    seg = fuse_labels([probs[lab] for lab in labels], labels)
    for label in labels:
        info[label]["voxels"] = int(np.count_nonzero(seg == label))
    return {"segmentation": seg, "probabilities": probs, "labels": info,
            "seconds": time.perf_counter() - start}
