"""Evaluate a trained DMAP model under the EP1 1-way 1-shot protocol (docs/protocol.md).

    python test.py with dataset=CHAOST2 eval_fold=0 data_root=data
    python test.py with dataset=CHAOST2 eval_fold=0 rotate_support=True reload_model_path=path/to/final.pth

Without ``reload_model_path`` the run folder of the command line's recipe (``config.run_dir``: the same
named configs and training overrides as the training command) is read: its ``eval_step`` snapshot (30,000
steps) when it exists, else ``final.pth``. The model and ``image_size`` are rebuilt from the training config
stored in the checkpoint; the command line gives the evaluation protocol (``supp_idx``, ``n_part``,
``rotate_support``, ``eval_batch``, ``amp``, ...). A model key or ``image_size`` set on the command line to
another value than the checkpoint's stops the run; ``eval_override`` changes them on purpose::

    python test.py with dataset=CHAOST2 eval_fold=0 model.dmap_mode=fixed eval_override.model.fixed_threshold=0.8

The protocol itself is :mod:`evaluation.ep1_fold`; this file turns the config into its arguments.

Writes to ``<run_dir>/results/``: ``results.json`` (scores and their provenance, :mod:`evaluation.provenance`),
``results.csv``, ``predictions/query_<id>.nii.gz`` (label maps in the query's geometry) and
``overlays/*.png`` (green ground truth, red prediction).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from config import (REPO_ROOT, ConfigError, configure_logging, evaluation_model_config, format_differences,
                    make_experiment, one_line_errors, resolve_config, training_differences)
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.folds import fold_volume_ids
from dataloaders.volume_io import Case, image_path, label_path, load_case
from evaluation.checkpoint_choice import check_checkpoint, default_checkpoint
from evaluation.ep1_fold import EP1Options, evaluate_fold
from evaluation.provenance import build_provenance, checkpoint_record, data_record
from evaluation.results import clear_results, format_table, write_results
from models.fewshot import FewShotSeg
from util.amp import resolve_amp
from util.checkpoints import load_checkpoint, select_weights
from util.distributed import select_device

LOGGER = logging.getLogger("test")
PROTOCOL_KEYS = ("supp_idx", "rotate_support", "n_part", "eval_batch", "amp", "save_predictions", "n_overlays",
                 "test_label")


def ep1_options(cfg: dict[str, Any], device: torch.device, image_size: int | None = None) -> EP1Options:
    """The EP1 settings of a resolved config, with ``amp`` and ``eval_batch`` made concrete for ``device``.

    ``image_size`` is the size the model runs at: the checkpoint's (:func:`model_settings`), not the
    command line's.
    """
    # bench/train_step.py: chunks of 8 slices cost 1.6x more per slice than single slices on 2 CPU cores
    eval_batch = cfg["eval_batch"] or (16 if device.type == "cuda" else 1)
    return EP1Options(test_labels=tuple(cfg["test_label"]), supp_idx=cfg["supp_idx"],
                      rotate_support=cfg["rotate_support"], n_part=cfg["n_part"], eval_batch=eval_batch,
                      amp=resolve_amp(cfg["amp"], device), image_size=image_size or None,
                      n_overlays=cfg["n_overlays"])


def fold_test_ids(cfg: dict[str, Any]) -> list[int]:
    """Ids of the evaluation fold's volumes (folder checked against the registry)."""
    return fold_volume_ids(cfg["data_dir"], get_dataset_spec(cfg["dataset"]), cfg["eval_fold"], cfg.get("volumes"))[1]


def load_fold_cases(cfg: dict[str, Any], test_ids: list[int]) -> list[Case]:
    """The volumes ``test_ids`` of the evaluation fold, with labels."""
    spec = get_dataset_spec(cfg["dataset"])
    return [load_case(cfg["data_dir"], case_id, spec, n_sv=None, load_label=True) for case_id in test_ids]


def checkpoint_path(cfg: dict[str, Any]) -> Path:
    """``reload_model_path``, else the run's default checkpoint (:func:`default_checkpoint`), checked to exist."""
    checkpoint = Path(cfg["reload_model_path"]) if cfg["reload_model_path"] else \
        default_checkpoint(Path(cfg["snapshot_dir"]), cfg.get("eval_step"), cfg["n_steps"])
    if not checkpoint.is_file():
        run = Path(cfg["run_dir"])
        prefix = f"{cfg['dataset']}_setting{cfg['setting']}_fold{cfg['eval_fold']}_"
        others = sorted(p.name for p in run.parent.glob(f"{prefix}*") if p != run and (p / "snapshots").is_dir())
        hint = f"; runs of other recipes there: {', '.join(others)} (give their training command's named " \
               "configs and overrides)" if others else ""
        raise ConfigError(f"config key 'reload_model_path': no checkpoint at {checkpoint} (train first, or "
                          f"pass reload_model_path=...){hint}")
    return checkpoint


def trained_config(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The training config stored in a checkpoint.

    Raises:
        ValueError: the checkpoint holds none (it was not written by training.py).
    """
    stored = state.get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ValueError(f"{path}: no training config in the checkpoint (expected a file written by training.py), "
                         "so the model it holds cannot be rebuilt")
    return stored


def model_settings(cfg: dict[str, Any], state: dict[str, Any], path: Path) -> tuple[dict[str, Any], int | None]:
    """The model sub-dict and image size to evaluate ``path`` with (:func:`config.evaluation_model_config`).

    The checkpoint the run folder holds (no ``reload_model_path``) must also have been trained with the
    command line's recipe: weights copied in by hand, or a folder renamed or named under another naming rule
    than ``config.experiment_name``'s, may hold another one.
    """
    stored = trained_config(state, path)
    if not cfg["reload_model_path"]:
        differences = training_differences(stored, cfg)
        if differences:
            raise ConfigError(f"{path} in the run folder was trained with another config than the command line "
                              f"gives: {format_differences(differences, 'checkpoint', 'command line')}; pass "
                              "reload_model_path=... to evaluate it as trained")
    return evaluation_model_config(cfg, stored, path)


def validate_test_inputs(cfg: dict[str, Any]) -> None:
    """Checks made before Sacred creates a run folder: the checkpoint exists and fits the command line's
    model keys, the fold's volumes."""
    checkpoint = checkpoint_path(cfg)
    model_settings(cfg, load_checkpoint(checkpoint, mmap=True), checkpoint)
    fold_test_ids(cfg)


def evaluation_record(cfg: dict[str, Any], options: EP1Options, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's settings as results.json records them."""
    return {**{key: cfg[key] for key in PROTOCOL_KEYS}, "dataset": cfg["dataset"], "setting": cfg["setting"],
            "eval_fold": cfg["eval_fold"], "eval_batch_used": options.eval_batch, "image_size": options.image_size,
            "model": model_cfg, "eval_override": cfg.get("eval_override") or {}, "model_from": "checkpoint"}


def run_test(cfg: dict[str, Any], out_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Load the checkpoint named by the config, evaluate, write the results; returns (summary, out_dir).

    The model and its image size are those the checkpoint was trained with (:func:`model_settings`);
    ``out_dir`` defaults to ``<run_dir>/results``; an earlier run's results there are removed first, so
    its files always come from this run.
    """
    start, device = time.perf_counter(), select_device(cfg["device"])
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    checkpoint = checkpoint_path(cfg)
    state = load_checkpoint(checkpoint)
    model_cfg, image_size = model_settings(cfg, state, checkpoint)
    options = ep1_options(cfg, device, image_size)
    test_ids = fold_test_ids(cfg)
    check_checkpoint(state, cfg["dataset"], cfg["eval_fold"], cfg["data_dir"], test_ids, checkpoint)
    weights, which = select_weights(state, cfg.get("eval_weights", "auto"), checkpoint)
    model = FewShotSeg.from_checkpoint(model_cfg, checkpoint, weights)
    record, stored = checkpoint_record(checkpoint, state, weights=which), trained_config(state, checkpoint)
    del state, weights
    LOGGER.info("loaded %s (step %s, %s weights); model as trained%s", checkpoint, record["step"], record["weights"],
                f", changed by eval_override {cfg['eval_override']}" if cfg.get("eval_override") else "")
    model.to(device).eval()
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg["run_dir"]) / "results"
    clear_results(out_dir)  # never leave this run's files beside an earlier run's
    summary = evaluate_fold(model, load_fold_cases(cfg, test_ids), get_dataset_spec(cfg["dataset"]), options, device,
                            out_dir if cfg["save_predictions"] else None)
    files = [f(cfg["data_dir"], i) for i in test_ids for f in (image_path, label_path)]
    provenance = build_provenance(REPO_ROOT, record, stored, evaluation_record(cfg, options, model_cfg),
                                  data_record(cfg["data_dir"], test_ids, files), device, options.amp,
                                  time.perf_counter() - start)
    summary = {"dataset": cfg["dataset"], "setting": cfg["setting"], "eval_fold": cfg["eval_fold"], **summary,
               "checkpoint": str(checkpoint), "weights": which, "provenance": provenance}
    write_results(summary, out_dir)
    return summary, out_dir


ex = make_experiment("test", validate=validate_test_inputs)


@ex.main
def main(_run, _config, eval_override):  # noqa: ARG001 (named so that Sacred accepts eval_override.model.<key>)
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
