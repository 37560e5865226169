"""What an evaluation leaves on disk and prints: ``results.json``, ``results.csv`` and the Dice table."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from evaluation.scores import METHODS, SCORES
from util.atomic_files import atomic_path, atomic_write_text

__all__ = ["write_results", "format_table", "clear_results"]

RESULT_FILES = ("results.json", "results.csv")
RESULT_FOLDERS = ("predictions", "overlays")


def write_results(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.csv`` (one row per support, class, query and method), each
    written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = (out_dir / name for name in RESULT_FILES)
    atomic_write_text(json_path, json.dumps(summary, indent=2))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["support_id", "class", "query_id", "method", *SCORES, "n_slices"])
        for run in summary["supports"]:
            for name, cls in run["classes"].items():
                for query_id, row in cls["per_query"].items():
                    for method in METHODS:
                        writer.writerow([run["support_id"], name, query_id, method,
                                         *(f"{row[method][k]:.4f}" for k in SCORES), row["n_slices"]])
    return json_path, csv_path


def format_table(summary: dict[str, Any]) -> str:
    """Dice, IoU, precision and recall per class for the model, and the copy-the-support baseline's Dice."""
    lines = [f"{'class':<16}{'Dice':>8}{'IoU':>8}{'Prec':>8}{'Recall':>8}{'copy Dice':>11}"]
    rows = list(summary["classes"].items()) + [("mean", summary["mean"])]
    for name, cls in rows:
        m = cls["model"]
        lines.append(f"{name:<16}{m['dice']:8.4f}{m['iou']:8.4f}{m['precision']:8.4f}{m['recall']:8.4f}"
                     f"{cls['copy_support']['dice']:11.4f}")
    return "\n".join(lines)


def clear_results(out_dir: Path) -> None:
    """Remove the files an earlier evaluation wrote into ``out_dir`` (and nothing else)."""
    for name in RESULT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RESULT_FOLDERS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
