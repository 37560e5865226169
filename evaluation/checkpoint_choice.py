"""Which checkpoint an evaluation reads, and whether it may be evaluated on the chosen fold."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from dataloaders.dataset_specifics import DATASETS, get_dataset_spec
from dataloaders.folds import split_fold
from dataloaders.volume_io import list_case_ids
from util.checkpoints import FINAL_NAME, step_checkpoint_name

LOGGER = logging.getLogger("test")

__all__ = ["default_checkpoint", "checkpoint_training_ids", "check_checkpoint"]


def default_checkpoint(snapshot_dir: Path, eval_step: Optional[int], n_steps: int) -> Path:
    """The checkpoint a run is evaluated with: the ``eval_step`` snapshot when it exists (the public
    protocol trains 33,000 steps and evaluates the 30,000-step snapshot), else ``final.pth`` (runs shorter
    than ``eval_step``, or ``eval_step`` 0/None)."""
    snapshot_dir = Path(snapshot_dir)
    if eval_step:
        step_path = snapshot_dir / step_checkpoint_name(eval_step)
        if step_path.is_file():
            return step_path
        if n_steps > eval_step:
            LOGGER.warning("no snapshot of step %d in %s: evaluating %s instead", eval_step, snapshot_dir, FINAL_NAME)
    return snapshot_dir / FINAL_NAME


def checkpoint_training_ids(state: dict[str, Any], dataset: str, data_dir: Optional[str]
                            ) -> tuple[str, int, list[int]] | None:
    """(data set, fold, training volume ids) of a checkpoint, or None when it does not say.

    Checkpoints record them under ``"fold"``; for older ones they are derived from the stored config's
    data set and fold (the registry's public ids, else the ids of the stored data folder or, for the data
    set being evaluated, of ``data_dir``).
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
        for folder in (stored.get("data_dir"), data_dir if spec.name == dataset else None):
            if folder and Path(folder).is_dir():
                ids = list_case_ids(folder)
                break
    if not ids:
        return None
    train_ids, _ = split_fold(ids, spec, int(stored["eval_fold"]))
    return spec.name, int(stored["eval_fold"]), train_ids


def check_checkpoint(state: dict[str, Any], dataset: str, eval_fold: int, data_dir: Optional[str],
                     test_ids: Sequence[int], path: Path) -> None:
    """Refuse a checkpoint trained on volumes of the evaluation fold; warn when it stopped early.

    Raises:
        ValueError: one line naming the checkpoint's fold and the overlapping volume ids.
    """
    trained = checkpoint_training_ids(state, dataset, data_dir)
    if trained is None:
        LOGGER.warning("%s does not say which volumes it was trained on: the fold is not checked", path)
    elif trained[0] != dataset:
        LOGGER.info("%s was trained on %s: evaluating on %s (no shared volumes)", path, trained[0], dataset)
    else:
        overlap = sorted(set(trained[2]) & set(test_ids))
        if overlap:
            raise ValueError(
                f"checkpoint {path} was trained on {trained[0]} fold {trained[1]}, whose training volumes "
                f"{overlap} are in evaluation fold {eval_fold}; use eval_fold={trained[1]} or that fold's checkpoint")
    n_steps = (state.get("config") or {}).get("n_steps")
    if isinstance(state.get("step"), int) and isinstance(n_steps, int) and state["step"] < n_steps:
        LOGGER.warning("%s stopped after %d of %d training steps (time limit or interruption; resume=True "
                       "finishes it)", path, state["step"], n_steps)
