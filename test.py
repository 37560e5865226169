"""Evaluate a trained DMAP model under the EP1 1-way 1-shot protocol (docs/protocol.md).

    python test.py with dataset=CHAOST2 eval_fold=0 data_root=../shared/data
    python test.py with dataset=CHAOST2 eval_fold=0 rotate_support=True reload_model_path=path/to/final.pth

Without ``reload_model_path`` the run's ``eval_step`` snapshot (30,000 steps) is evaluated when it exists,
else ``final.pth``.

For each test class and each query volume of the fold, the query's slices that contain the class are cut
into ``n_part`` chunks; chunk k is segmented with the support slice at position k (1/6, 1/2, 5/6 of the
support's labelled slices), the support being encoded once per chunk. Scores are 3-D over the kept slices.
Beside the model, the copy-the-support baseline (each query slice predicted as its chunk's support mask)
shows what the model adds.

Writes to ``<run_dir>/results/``: ``results.json``, ``results.csv``, ``predictions/query_<id>.nii.gz``
(label maps in the query's geometry) and ``overlays/*.png`` (green ground truth, red prediction).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tqdm import tqdm

from config import ConfigError, configure_logging, make_experiment, one_line_errors, resolve_config
from dataloaders.dataset_specifics import DATASETS, DatasetSpec, get_dataset_spec
from dataloaders.resize import resize_images, resize_masks, resize_probabilities
from dataloaders.ep1 import build_test_chunks, labelled_slices
from dataloaders.folds import fold_volume_ids, split_fold
from dataloaders.volume_io import Case, list_case_ids, load_case, read_direction, read_nifti, write_nifti_like
from models.fewshot import FewShotSeg
from util.amp import AmpUnsupported, autocast, resolve_amp
from util.checkpoints import FINAL_NAME, load_checkpoint, load_model_weights, step_checkpoint_name
from util.distributed import select_device
from util.metrics import segmentation_scores
from util.visualisation import save_overlay

LOGGER = logging.getLogger("test")
SCORES = ("dice", "iou", "precision", "recall")


@torch.inference_mode()
def predict_query(model: FewShotSeg, support: Case, query: Case, label: int, n_part: int, eval_batch: int,
                  device: torch.device, amp: str = "off", image_size: int | None = None) -> dict[str, np.ndarray]:
    """Segment the slices of ``query`` that contain ``label``.

    Args:
        amp: a resolved precision (``util.amp.resolve_amp``): ``"off"``, ``"bf16"`` or ``"fp16"``.
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


def _nanmean(values: list[float]) -> float:
    """Mean over the defined values (NaN marks an undefined score); NaN when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values[~np.isnan(values)])) if (~np.isnan(values)).any() else math.nan


def _nanstd(values: list[float]) -> float:
    """Population standard deviation over the defined values; NaN when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values[~np.isnan(values)])) if (~np.isnan(values)).any() else math.nan


def _mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Score-wise mean of several score dicts, NaN entries left out (MONAI / nnU-Net convention)."""
    return {key: _nanmean([row[key] for row in rows]) for key in SCORES}


NAN_SCORES = {key: math.nan for key in SCORES}


def check_supports(cases: list[Case], positions: list[int], labels: list[int], spec: DatasetSpec) -> None:
    """Every support volume to be used must contain every test class; checked before any work.

    Raises:
        ConfigError: one line naming each support volume and the classes it lacks.
    """
    problems = []
    for pos in positions:
        lacking = [f"{spec.label_names[label]} ({label})" for label in labels
                   if labelled_slices(cases[pos].label, label).size == 0]
        if lacking:
            problems.append(f"volume {cases[pos].case_id} ({cases[pos].image_path}) has no {', '.join(lacking)}")
    if problems:
        raise ConfigError("support " + "; ".join(problems) + "; choose another supp_idx or set test_label")


def evaluate_support(model: FewShotSeg, cases: list[Case], supp_idx: int, spec: DatasetSpec, labels: list[int],
                     cfg: dict[str, Any], device: torch.device, out_dir: Path | None,
                     progress: tqdm | None = None) -> dict[str, Any]:
    """EP1 with the fold member at position ``supp_idx`` as support and the others as queries.

    A query volume without a class scores NaN for it (with a warning) and is left out of that class's
    mean. When ``out_dir`` is given, predictions (NIfTI label maps) and overlays are written there.
    Label-map merge: a voxel takes the class with the highest foreground probability above 0.5.
    """
    support, queries = cases[supp_idx], [c for i, c in enumerate(cases) if i != supp_idx]
    classes: dict[str, Any] = {}
    label_maps = {q.case_id: (np.zeros(q.image.shape, np.uint8), np.zeros(q.image.shape, np.float32))
                  for q in queries}
    for label in labels:
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
            result = predict_query(model, support, query, label, cfg["n_part"], cfg["eval_batch"], device, cfg["amp"],
                                   cfg.get("image_size"))
            pred = (result["prob"] > 0.5).astype(np.uint8)
            per_query[str(query.case_id)] = {
                "model": segmentation_scores(pred, result["target"]),
                "copy_support": segmentation_scores(result["copy"], result["target"]),
                "n_slices": int(len(result["slices"])),
            }
            labels_vol, best_prob = label_maps[query.case_id]
            for i, z in enumerate(result["slices"]):
                better = (result["prob"][i] > 0.5) & (result["prob"][i] > best_prob[z])
                labels_vol[z][better], best_prob[z][better] = label, result["prob"][i][better]
            if out_dir is not None and cfg["n_overlays"] > 0:
                direction = read_direction(query.image_path)  # pictures in the radiological convention
                picks = np.unique(np.linspace(0, len(result["slices"]) - 1, cfg["n_overlays"]).round().astype(int))
                for i in picks:
                    z = int(result["slices"][i])
                    save_overlay(out_dir / "overlays" / f"{name}_query{query.case_id}_z{z:03d}.png",
                                 query.image[z], result["target"][i], pred[i], direction=direction)
        classes[name] = {
            "label": label,
            "model": _mean_scores([q["model"] for q in per_query.values()]),
            "copy_support": _mean_scores([q["copy_support"] for q in per_query.values()]),
            "per_query": per_query,
        }
    if out_dir is not None:
        for query in queries:
            _, reference = read_nifti(query.image_path)
            write_nifti_like(label_maps[query.case_id][0], reference,
                             out_dir / "predictions" / f"query_{query.case_id}.nii.gz")
    return {
        "supp_idx": supp_idx,
        "support_id": support.case_id,
        "classes": classes,
        "mean": {method: _mean_scores([c[method] for c in classes.values()]) for method in ("model", "copy_support")},
    }


def load_fold_cases(cfg: dict[str, Any]) -> list[Case]:
    """The volumes of the evaluation fold (folder checked against the registry), with labels."""
    spec = get_dataset_spec(cfg["dataset"])
    _, test_ids = fold_volume_ids(cfg["data_dir"], spec, cfg["eval_fold"], cfg.get("volumes"))
    return [load_case(cfg["data_dir"], case_id, spec, n_sv=None, load_label=True) for case_id in test_ids]


def evaluate_fold(model: FewShotSeg, cfg: dict[str, Any], device: torch.device,
                  out_dir: Path | None, cases: list[Case] | None = None) -> dict[str, Any]:
    """Run EP1 on the evaluation fold (optionally rotating the support) and aggregate the scores.

    Aggregation: per support, a class's score is the mean over query volumes and the overall score the
    mean over classes; the summary averages each over the supports (one support unless
    ``rotate_support``) and gives the population standard deviation of Dice over supports. Means skip
    NaN (undefined) scores.

    Args:
        cases: the fold's volumes, sorted by id; None loads them (:func:`load_fold_cases`).
    """
    if not cfg["eval_batch"]:
        # bench/train_step.py: chunks of 8 slices cost 1.6x more per slice than single slices on 2 CPU cores
        cfg = dict(cfg, eval_batch=16 if device.type == "cuda" else 1)
    spec = get_dataset_spec(cfg["dataset"])
    if cases is None:
        cases = load_fold_cases(cfg)
    test_ids = [c.case_id for c in cases]
    if not 0 <= cfg["supp_idx"] < len(cases):
        raise ConfigError(f"config key 'supp_idx' is {cfg['supp_idx']}; fold {cfg['eval_fold']} has "
                          f"{len(cases)} volumes (0..{len(cases) - 1})")
    order = [cfg["supp_idx"]] + ([i for i in range(len(cases)) if i != cfg["supp_idx"]] if cfg["rotate_support"] else [])
    check_supports(cases, order, cfg["test_label"], spec)
    runs = []
    progress = tqdm(total=len(order) * len(cfg["test_label"]) * (len(cases) - 1), desc="test", unit="query",
                    dynamic_ncols=True, disable=None)
    try:
        for i, supp_idx in enumerate(order):
            LOGGER.info("support volume %d (position %d of fold %d); query volumes %s", cases[supp_idx].case_id,
                        supp_idx, cfg["eval_fold"], [c.case_id for j, c in enumerate(cases) if j != supp_idx])
            # predictions and pictures for the configured support only
            runs.append(evaluate_support(model, cases, supp_idx, spec, cfg["test_label"], cfg, device,
                                         out_dir if i == 0 else None, progress))
    finally:
        progress.close()
    summary: dict[str, Any] = {
        "dataset": cfg["dataset"], "setting": cfg["setting"], "eval_fold": cfg["eval_fold"],
        "test_ids": [int(x) for x in test_ids], "test_label": cfg["test_label"],
        "classes": {}, "mean": {}, "supports": runs,
    }
    for name in runs[0]["classes"]:
        summary["classes"][name] = {
            method: {key: _nanmean([r["classes"][name][method][key] for r in runs]) for key in SCORES}
            for method in ("model", "copy_support")
        }
        summary["classes"][name]["dice_std_over_supports"] = _nanstd(
            [r["classes"][name]["model"]["dice"] for r in runs])
    for method in ("model", "copy_support"):
        summary["mean"][method] = {key: _nanmean([r["mean"][method][key] for r in runs]) for key in SCORES}
    summary["mean"]["dice_std_over_supports"] = _nanstd([r["mean"]["model"]["dice"] for r in runs])
    return summary


def write_results(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.csv`` (one row per support, class, query and method)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, json_path)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["support_id", "class", "query_id", "method", *SCORES, "n_slices"])
        for run in summary["supports"]:
            for name, cls in run["classes"].items():
                for query_id, row in cls["per_query"].items():
                    for method in ("model", "copy_support"):
                        writer.writerow([run["support_id"], name, query_id, method,
                                         *(f"{row[method][k]:.4f}" for k in SCORES), row["n_slices"]])
    return json_path, csv_path


def format_table(summary: dict[str, Any]) -> str:
    """Dice per class for the model and the copy-the-support baseline, as text."""
    lines = [f"{'class':<16}{'Dice':>8}{'IoU':>8}{'Prec':>8}{'Recall':>8}{'copy Dice':>11}"]
    rows = list(summary["classes"].items()) + [("mean", summary["mean"])]
    for name, cls in rows:
        m = cls["model"]
        lines.append(f"{name:<16}{m['dice']:8.4f}{m['iou']:8.4f}{m['precision']:8.4f}{m['recall']:8.4f}"
                     f"{cls['copy_support']['dice']:11.4f}")
    return "\n".join(lines)


def default_checkpoint(cfg: dict[str, Any]) -> Path:
    """The checkpoint ``test.py`` evaluates: ``reload_model_path``, else the ``eval_step`` snapshot (the
    public protocol: 33,000 training steps, the 30,000-step snapshot evaluated) when it exists, else
    ``final.pth`` (runs shorter than ``eval_step``, or ``eval_step`` 0/None)."""
    if cfg["reload_model_path"]:
        return Path(cfg["reload_model_path"])
    snapshot_dir = Path(cfg["snapshot_dir"])
    if cfg.get("eval_step"):
        step_path = snapshot_dir / step_checkpoint_name(cfg["eval_step"])
        if step_path.is_file():
            return step_path
        if cfg["n_steps"] > cfg["eval_step"]:
            LOGGER.warning("no snapshot of step %d in %s: evaluating %s instead", cfg["eval_step"], snapshot_dir,
                           FINAL_NAME)
    return snapshot_dir / FINAL_NAME


def checkpoint_path(cfg: dict[str, Any]) -> Path:
    """The checkpoint to evaluate (:func:`default_checkpoint`), checked to exist."""
    checkpoint = default_checkpoint(cfg)
    if not checkpoint.is_file():
        raise ConfigError(f"config key 'reload_model_path': no checkpoint at {checkpoint} (train first, or "
                          "pass reload_model_path=...)")
    return checkpoint


def checkpoint_training_ids(state: dict[str, Any], cfg: dict[str, Any]) -> tuple[str, int, list[int]] | None:
    """(data set, fold, training volume ids) of a checkpoint, or None when it does not say.

    Checkpoints record them under ``"fold"``; for older ones they are derived from the stored config's
    data set and fold (the registry's public ids, else the ids of the data folder).
    """
    if isinstance(state.get("fold"), dict):
        fold = state["fold"]
        return str(fold["dataset"]), int(fold["eval_fold"]), [int(x) for x in fold["train_ids"]]
    stored = state.get("config")
    if not isinstance(stored, dict) or str(stored.get("dataset", "")).upper() not in DATASETS:
        return None
    spec = get_dataset_spec(stored["dataset"])
    ids = stored.get("volumes") or spec.case_ids
    if not ids:
        for folder in (stored.get("data_dir"), cfg["data_dir"] if spec.name == cfg["dataset"] else None):
            if folder and Path(folder).is_dir():
                ids = list_case_ids(folder)
                break
    if not ids:
        return None
    train_ids, _ = split_fold(ids, spec, int(stored["eval_fold"]))
    return spec.name, int(stored["eval_fold"]), train_ids


def check_checkpoint(state: dict[str, Any], cfg: dict[str, Any], test_ids: list[int], path: Path) -> None:
    """Refuse a checkpoint trained on volumes of the evaluation fold; warn when it stopped early.

    Raises:
        ConfigError: one line naming the checkpoint's fold and the overlapping volume ids.
    """
    trained = checkpoint_training_ids(state, cfg)
    if trained is None:
        LOGGER.warning("%s does not say which volumes it was trained on: the fold is not checked", path)
    elif trained[0] != cfg["dataset"]:
        LOGGER.info("%s was trained on %s: evaluating on %s (no shared volumes)", path, trained[0], cfg["dataset"])
    else:
        overlap = sorted(set(trained[2]) & set(test_ids))
        if overlap:
            raise ConfigError(
                f"checkpoint {path} was trained on {trained[0]} fold {trained[1]}, whose training volumes "
                f"{overlap} are in evaluation fold {cfg['eval_fold']}; use eval_fold={trained[1]} or that "
                "fold's checkpoint")
    n_steps = (state.get("config") or {}).get("n_steps")
    if isinstance(state.get("step"), int) and isinstance(n_steps, int) and state["step"] < n_steps:
        LOGGER.warning("%s stopped after %d of %d training steps (time limit or interruption; resume=True "
                       "finishes it)", path, state["step"], n_steps)


def validate_test_inputs(cfg: dict[str, Any]) -> None:
    """Checks made before Sacred creates a run folder: the checkpoint exists, the fold's volumes."""
    checkpoint_path(cfg)
    fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"], cfg.get("volumes"))


def clear_results(out_dir: Path) -> None:
    """Remove the files an earlier evaluation wrote into ``out_dir`` (and nothing else)."""
    for name in ("results.json", "results.csv"):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("predictions", "overlays"):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def run_test(cfg: dict[str, Any], out_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Load the checkpoint named by the config, evaluate, write the results; returns (summary, out_dir).

    ``out_dir`` defaults to ``<run_dir>/results``; an earlier run's results there are removed first, so
    its files always come from this run.
    """
    device = select_device(cfg["device"])
    try:
        cfg = dict(cfg, amp=resolve_amp(cfg["amp"], device))
    except AmpUnsupported as exc:
        raise ConfigError(str(exc)) from None
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    checkpoint = checkpoint_path(cfg)
    state = load_checkpoint(checkpoint)
    _, test_ids = fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"],
                                  cfg.get("volumes"))
    check_checkpoint(state, cfg, test_ids, checkpoint)
    model_cfg = dict(cfg["model"], weights_path="")  # the checkpoint holds every weight
    with warnings.catch_warnings():  # "randomly initialised" is true only until the next line
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = FewShotSeg.from_config(model_cfg)
    n_loaded = load_model_weights(model, checkpoint, state=state)
    del state
    LOGGER.info("loaded %d tensors from %s", n_loaded, checkpoint)
    model.to(device).eval()
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg["run_dir"]) / "results"
    clear_results(out_dir)  # never leave this run's files beside an earlier run's
    summary = evaluate_fold(model, cfg, device, out_dir if cfg["save_predictions"] else None,
                            cases=load_fold_cases(cfg))
    summary["checkpoint"] = str(checkpoint)
    write_results(summary, out_dir)
    return summary, out_dir


ex = make_experiment("test", validate=validate_test_inputs)


@ex.main
def main(_run, _config):
    """Sacred entry point: validate, evaluate, print the table, store results as artifacts."""
    with one_line_errors("test"):
        cfg = resolve_config(_config, need_supervoxels=False)
        summary, out_dir = run_test(cfg)
    print(format_table(summary))
    print(f"results: {out_dir / 'results.json'}")
    for name in ("results.json", "results.csv"):
        _run.add_artifact(str(out_dir / name), name)
    for name, cls in summary["classes"].items():
        _run.log_scalar(f"dice/{name}", cls["model"]["dice"])
    return summary["mean"]["model"]["dice"]


if __name__ == "__main__":
    configure_logging()
    ex.run_commandline()
