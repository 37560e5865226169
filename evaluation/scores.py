"""How EP1 scores are averaged into the reported numbers.

Per support volume, a class's score is the mean over its query volumes and the support's overall score
the mean over classes; the fold's summary averages each over the supports (one unless the support is
rotated) and gives the population standard deviation of Dice over supports. Every mean leaves out NaN,
the mark of an undefined score (a query without the class), as MONAI and nnU-Net do.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["SCORES", "METHODS", "NAN_SCORES", "nanmean", "nanstd", "sample_std", "mean_scores", "summarize_supports"]

SCORES = ("dice", "iou", "precision", "recall")
#: the model and the copy-the-support baseline (each query slice predicted as its chunk's support mask)
METHODS = ("model", "copy_support")
NAN_SCORES = {key: math.nan for key in SCORES}


def _defined(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[~np.isnan(values)]


def nanmean(values: Sequence[float]) -> float:
    """Mean over the defined values; NaN when none is defined."""
    defined = _defined(values)
    return float(np.mean(defined)) if defined.size else math.nan


def nanstd(values: Sequence[float]) -> float:
    """Population standard deviation over the defined values; NaN when none is defined."""
    defined = _defined(values)
    return float(np.std(defined)) if defined.size else math.nan


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1), the spread over folds and seeds that every report gives.

    Unlike :func:`nanstd` it keeps NaN (callers leave undefined values out first); 0 for one value, NaN for
    none.
    """
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0 if values.size else math.nan


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Score-wise mean of several score dicts (keys :data:`SCORES`), NaN entries left out."""
    return {key: nanmean([row[key] for row in rows]) for key in SCORES}


def summarize_supports(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fold's numbers from one result per support volume.

    Args:
        runs: results of :func:`evaluation.ep1_fold.evaluate_support`, each with ``classes[name][method]``
            and ``mean[method]`` score dicts.

    Returns:
        ``{"classes": {name: {method: scores, "dice_std_over_supports": float}}, "mean": {method: scores,
        "dice_std_over_supports": float}}``: means over supports, and the spread of the model's Dice.
    """
    classes: dict[str, Any] = {}
    for name in runs[0]["classes"]:
        classes[name] = {method: mean_scores([r["classes"][name][method] for r in runs]) for method in METHODS}
        classes[name]["dice_std_over_supports"] = nanstd([r["classes"][name]["model"]["dice"] for r in runs])
    mean: dict[str, Any] = {method: mean_scores([r["mean"][method] for r in runs]) for method in METHODS}
    mean["dice_std_over_supports"] = nanstd([r["mean"]["model"]["dice"] for r in runs])
    return {"classes": classes, "mean": mean}
