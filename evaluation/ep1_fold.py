"""EP1 evaluation of one fold: segment every query volume with the support volume, score, keep the maps.

For each test class and each query volume of the fold, the query's slices that contain the class are cut
into ``n_part`` chunks; chunk k is segmented with the support slice at position k (1/6, 1/2, 5/6 of the
support's labelled slices, :mod:`dataloaders.ep1`), the support being encoded once per chunk. Scores are
3-D over the kept slices. Beside the model, the copy-the-support baseline (each query slice predicted as
its chunk's support mask) shows what the model adds. Aggregation: :mod:`evaluation.scores`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dataloaders.dataset_specifics import DatasetSpec
from dataloaders.ep1 import build_test_chunks, labelled_slices, support_positions
from dataloaders.resize import resize_images, resize_masks, resize_probabilities
from dataloaders.volume_io import Case, read_direction, read_nifti, write_nifti_like
from evaluation.scores import METHODS, NAN_SCORES, mean_scores, summarize_supports
from models.fewshot import FewShotSeg
from util.amp import autocast
from util.metrics import segmentation_scores
from util.visualisation import save_overlay

LOGGER = logging.getLogger("test")

__all__ = ["EP1Options", "predict_query", "check_supports", "evaluate_support", "evaluate_fold"]


@dataclass(frozen=True)
class EP1Options:
    """How EP1 is run.

    Attributes:
        test_labels: Test classes (training ids), in reporting order.
        supp_idx: Position in the sorted fold of the support volume.
        rotate_support: Also evaluate with every other fold member as the support.
        n_part: Support slices / query chunks per class.
        eval_batch: Query slices per forward pass.
        amp: A resolved precision (``util.amp.resolve_amp``): ``"off"``, ``"bf16"`` or ``"fp16"``.
        image_size: Run the model at ``image_size x image_size`` (None: the data's size).
        n_overlays: Overlay pictures per (class, query volume), 0 for none.
    """

    test_labels: tuple
    supp_idx: int = 0
    rotate_support: bool = False
    n_part: int = 3
    eval_batch: int = 1
    amp: str = "off"
    image_size: Optional[int] = None
    n_overlays: int = 0


@torch.inference_mode()
def predict_query(model: FewShotSeg, support: Case, query: Case, label: int, n_part: int, eval_batch: int,
                  device: torch.device, amp: str = "off", image_size: int | None = None) -> dict[str, np.ndarray]:
    """Segment the slices of ``query`` that contain ``label``.

    Args:
        amp: a resolved precision (``util.amp.resolve_amp``).
        image_size: run the model at ``image_size x image_size`` (None: the data's size); the
            probabilities are resized back to the label grid [H, W].

    Returns:
        ``slices`` [n] slice indices in the query volume, ``prob`` [n, H, W] float32 foreground
        probability, ``copy`` [n, H, W] uint8 copy-the-support baseline, ``target`` [n, H, W] uint8.
    """
    grid = tuple(query.image.shape[1:])
    size = image_size or None
    slices, probs, copies, targets = [], [], [], []
    for chunk in build_test_chunks(support, query, label, n_part=n_part):
        support_image = torch.as_tensor(chunk.support_image)[None]
        support_mask = torch.as_tensor(chunk.support_mask)[None]
        if size:
            support_image, support_mask = resize_images(support_image, size), resize_masks(support_mask, size)
        with autocast(device, amp):
            encoding = model.encode_support(support_image.to(device), support_mask.to(device))
            for start in range(0, len(chunk.query_images), eval_batch):
                batch = torch.as_tensor(chunk.query_images[start:start + eval_batch])
                if size:
                    batch = resize_images(batch, size)
                prob, _ = model.segment(encoding, batch.to(device))
                prob = prob[:, 1].float().cpu()
                probs.append(resize_probabilities(prob, grid).numpy() if size else prob.numpy())
        slices.extend(chunk.slice_indices)
        copies.append(np.repeat((chunk.support_mask > 0.5)[None], len(chunk.slice_indices), 0).astype(np.uint8))
        targets.append(np.asarray(chunk.query_labels, dtype=np.uint8))
    return {"slices": np.asarray(slices, dtype=np.int64), "prob": np.concatenate(probs),
            "copy": np.concatenate(copies), "target": np.concatenate(targets)}


def check_supports(cases: Sequence[Case], positions: Sequence[int], labels: Sequence[int], spec: DatasetSpec) -> None:
    """Every support volume to be used must contain every test class; checked before any work.

    Raises:
        ValueError: one line naming each support volume and the classes it lacks.
    """
    problems = []
    for pos in positions:
        lacking = [f"{spec.label_names[label]} ({label})" for label in labels
                   if labelled_slices(cases[pos].label, label).size == 0]
        if lacking:
            problems.append(f"volume {cases[pos].case_id} ({cases[pos].image_path}) has no {', '.join(lacking)}")
    if problems:
        raise ValueError("support " + "; ".join(problems) + "; choose another supp_idx or set test_label")


def _merge_into_label_map(label_map: tuple[np.ndarray, np.ndarray], result: dict[str, np.ndarray], label: int) -> None:
    """Label-map fusion: a voxel takes the class with the highest foreground probability above 0.5."""
    labels_vol, best_prob = label_map
    for i, z in enumerate(result["slices"]):
        better = (result["prob"][i] > 0.5) & (result["prob"][i] > best_prob[z])
        labels_vol[z][better], best_prob[z][better] = label, result["prob"][i][better]


def _save_overlays(out_dir: Path, name: str, query: Case, result: dict[str, np.ndarray], pred: np.ndarray,
                   n_overlays: int) -> None:
    """``n_overlays`` evenly spaced pictures of the kept slices (radiological convention)."""
    direction = read_direction(query.image_path)
    picks = np.unique(np.linspace(0, len(result["slices"]) - 1, n_overlays).round().astype(int))
    for i in picks:
        z = int(result["slices"][i])
        save_overlay(out_dir / "overlays" / f"{name}_query{query.case_id}_z{z:03d}.png",
                     query.image[z], result["target"][i], pred[i], direction=direction)


def _score_query(model: FewShotSeg, support: Case, query: Case, label: int, options: EP1Options,
                 device: torch.device) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(scores row, raw prediction, binary prediction) of one query volume and class."""
    result = predict_query(model, support, query, label, options.n_part, options.eval_batch, device, options.amp,
                           options.image_size)
    pred = (result["prob"] > 0.5).astype(np.uint8)
    row = {"model": segmentation_scores(pred, result["target"]),
           "copy_support": segmentation_scores(result["copy"], result["target"]),
           "n_slices": int(len(result["slices"]))}
    return row, result, pred


def evaluate_support(model: FewShotSeg, cases: Sequence[Case], supp_idx: int, spec: DatasetSpec,
                     options: EP1Options, device: torch.device, out_dir: Path | None,
                     progress: tqdm | None = None) -> dict[str, Any]:
    """EP1 with the fold member at position ``supp_idx`` as support and the others as queries.

    A query volume without a class scores NaN for it (with a warning) and is left out of that class's
    mean. When ``out_dir`` is given, predictions (NIfTI label maps, :func:`_merge_into_label_map`) and
    overlays are written there.
    """
    support, queries = cases[supp_idx], [c for i, c in enumerate(cases) if i != supp_idx]
    classes: dict[str, Any] = {}
    label_maps = {q.case_id: (np.zeros(q.image.shape, np.uint8), np.zeros(q.image.shape, np.float32))
                  for q in queries}
    for label in options.test_labels:
        name = spec.label_names[label]
        per_query: dict[str, Any] = {}
        for query in queries:
            if progress is not None:
                progress.set_postfix_str(f"support {support.case_id} {name} query {query.case_id}")
                progress.update(1)
            if labelled_slices(query.label, label).size == 0:
                LOGGER.warning("query volume %d has no %s: scored NaN, left out of the means", query.case_id, name)
                per_query[str(query.case_id)] = {"model": dict(NAN_SCORES), "copy_support": dict(NAN_SCORES),
                                                 "n_slices": 0}
                continue
            row, result, pred = _score_query(model, support, query, label, options, device)
            per_query[str(query.case_id)] = row
            _merge_into_label_map(label_maps[query.case_id], result, label)
            if out_dir is not None and options.n_overlays > 0:
                _save_overlays(out_dir, name, query, result, pred, options.n_overlays)
        classes[name] = {"label": label, **{m: mean_scores([q[m] for q in per_query.values()]) for m in METHODS},
                         "per_query": per_query}
    if out_dir is not None:
        for query in queries:
            _, reference = read_nifti(query.image_path)
            write_nifti_like(label_maps[query.case_id][0], reference,
                             out_dir / "predictions" / f"query_{query.case_id}.nii.gz")
    return {"supp_idx": supp_idx, "support_id": support.case_id, "classes": classes,
            "mean": {m: mean_scores([c[m] for c in classes.values()]) for m in METHODS}}


def evaluate_fold(model: FewShotSeg, cases: Sequence[Case], spec: DatasetSpec, options: EP1Options,
                  device: torch.device, out_dir: Path | None = None) -> dict[str, Any]:
    """Run EP1 on a fold (optionally rotating the support) and aggregate the scores.

    Args:
        cases: the fold's volumes with labels, sorted by id.
        out_dir: where the configured support's predictions and pictures go (None: nowhere).

    Returns:
        ``test_ids``, ``test_label``, ``classes`` and ``mean`` (:func:`evaluation.scores.summarize_supports`)
        and ``supports`` (one :func:`evaluate_support` result per support).

    Raises:
        ValueError: ``supp_idx`` outside the fold, or a support volume without a test class.
    """
    order = support_positions(len(cases), options.supp_idx, options.rotate_support)
    check_supports(cases, order, options.test_labels, spec)
    runs = []
    progress = tqdm(total=len(order) * len(options.test_labels) * (len(cases) - 1), desc="test", unit="query",
                    dynamic_ncols=True, disable=None)
    try:
        for i, supp_idx in enumerate(order):
            LOGGER.info("support volume %d (position %d); query volumes %s", cases[supp_idx].case_id, supp_idx,
                        [c.case_id for j, c in enumerate(cases) if j != supp_idx])
            runs.append(evaluate_support(model, cases, supp_idx, spec, options, device,
                                         out_dir if i == 0 else None, progress))
    finally:
        progress.close()
    return {"test_ids": [int(c.case_id) for c in cases], "test_label": [int(x) for x in options.test_labels],
            **summarize_supports(runs), "supports": runs}
