"""Evaluate a trained DMAP model under the EP1 1-way 1-shot protocol (docs/protocol.md).

    python test.py with dataset=CHAOST2 eval_fold=0 data_root=data
    python test.py with dataset=CHAOST2 eval_fold=0 rotate_support=True reload_model_path=path/to/final.pth

Without ``reload_model_path`` the run's ``eval_step`` snapshot (30,000 steps) is evaluated when it exists,
else ``final.pth``. The protocol itself is :mod:`evaluation.ep1_fold`; this file turns the config into its
arguments.

Writes to ``<run_dir>/results/``: ``results.json``, ``results.csv``, ``predictions/query_<id>.nii.gz``
(label maps in the query's geometry) and ``overlays/*.png`` (green ground truth, red prediction).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from config import ConfigError, configure_logging, make_experiment, one_line_errors, resolve_config
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.folds import fold_volume_ids
from dataloaders.volume_io import Case, load_case
from evaluation.checkpoint_choice import check_checkpoint, default_checkpoint
from evaluation.ep1_fold import EP1Options, evaluate_fold
from evaluation.results import clear_results, format_table, write_results
from models.fewshot import FewShotSeg
from util.amp import resolve_amp
from util.checkpoints import load_checkpoint, select_weights
from util.distributed import select_device

LOGGER = logging.getLogger("test")


def ep1_options(cfg: dict[str, Any], device: torch.device) -> EP1Options:
    """The EP1 settings of a resolved config, with ``amp`` and ``eval_batch`` made concrete for ``device``."""
    # bench/train_step.py: chunks of 8 slices cost 1.6x more per slice than single slices on 2 CPU cores
    eval_batch = cfg["eval_batch"] or (16 if device.type == "cuda" else 1)
    return EP1Options(test_labels=tuple(cfg["test_label"]), supp_idx=cfg["supp_idx"],
                      rotate_support=cfg["rotate_support"], n_part=cfg["n_part"], eval_batch=eval_batch,
                      amp=resolve_amp(cfg["amp"], device), image_size=cfg.get("image_size") or None,
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
        raise ConfigError(f"config key 'reload_model_path': no checkpoint at {checkpoint} (train first, or "
                          "pass reload_model_path=...)")
    return checkpoint


def validate_test_inputs(cfg: dict[str, Any]) -> None:
    """Checks made before Sacred creates a run folder: the checkpoint exists, the fold's volumes."""
    checkpoint_path(cfg)
    fold_test_ids(cfg)


def run_test(cfg: dict[str, Any], out_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Load the checkpoint named by the config, evaluate, write the results; returns (summary, out_dir).

    ``out_dir`` defaults to ``<run_dir>/results``; an earlier run's results there are removed first, so
    its files always come from this run.
    """
    device = select_device(cfg["device"])
    options = ep1_options(cfg, device)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    checkpoint = checkpoint_path(cfg)
    state = load_checkpoint(checkpoint)
    test_ids = fold_test_ids(cfg)
    check_checkpoint(state, cfg["dataset"], cfg["eval_fold"], cfg["data_dir"], test_ids, checkpoint)
    weights, which = select_weights(state, cfg.get("eval_weights", "auto"), checkpoint)
    model = FewShotSeg.from_checkpoint(cfg["model"], checkpoint, weights)
    del state, weights
    LOGGER.info("loaded the %s weights of %s", which, checkpoint)
    model.to(device).eval()
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg["run_dir"]) / "results"
    clear_results(out_dir)  # never leave this run's files beside an earlier run's
    summary = evaluate_fold(model, load_fold_cases(cfg, test_ids), get_dataset_spec(cfg["dataset"]), options, device,
                            out_dir if cfg["save_predictions"] else None)
    summary = {"dataset": cfg["dataset"], "setting": cfg["setting"], "eval_fold": cfg["eval_fold"], **summary,
               "checkpoint": str(checkpoint), "weights": which}
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
