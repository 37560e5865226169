"""Aggregate per-fold ``results.json`` files into a mean +- std table per organ.

    python script/summarize.py runs            # every <experiment>/results/results.json below runs/

Runs are grouped by experiment name without its fold (e.g. ``CHAOST2_setting1_learned``, or
``CHAOST2_setting1_learned_cpu-3f2a9c1e`` for another recipe); for each group the Dice of each organ is
averaged over folds (mean +- sample standard deviation over folds), and so is the copy-the-support baseline's.
The folds of a group must have been trained with the same config in every training-relevant key but the fold
(``provenance.training_config`` of each results.json, ``config.training_differences``); otherwise the run
stops with one line naming the key, unless ``--allow-mixed`` is given. Writes ``summary.json`` (with each
fold's provenance: results file, commit, checkpoint hash and step, data digest) and ``summary.csv`` in the
folder given.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from config import format_differences, training_differences  # noqa: E402
from evaluation.scores import sample_std  # noqa: E402

FOLD_PATTERN = re.compile(r"_fold\d+")


def collect(root: Path) -> dict[str, list[dict]]:
    """Results grouped by experiment name with the fold removed."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.glob("*/results/results.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: cannot read {path}: {exc}") from None
        result["_path"] = str(path)
        groups[FOLD_PATTERN.sub("", path.parent.parent.name)].append(result)
    return groups


def summarize_group(results: list[dict]) -> dict:
    """Mean and sample standard deviation (``evaluation.scores.sample_std``; 0 for one fold) over folds of
    each class's Dice (model and copy baseline)."""
    names = list(results[0]["classes"])
    table = {}
    for name in names + ["mean"]:
        picks = [r["mean"] for r in results] if name == "mean" else [r["classes"][name] for r in results
                                                                      if name in r["classes"]]
        # a fold where the class was undefined (NaN: absent from every query) is left out
        model = np.array([p["model"]["dice"] for p in picks], dtype=np.float64)
        copy = np.array([p["copy_support"]["dice"] for p in picks], dtype=np.float64)
        defined = ~np.isnan(model)
        model, copy = model[defined], copy[defined]
        table[name] = {"dice_mean": float(np.mean(model)) if model.size else float("nan"),
                       "dice_std": sample_std(model),
                       "copy_dice_mean": float(np.mean(copy)) if copy.size else float("nan"),
                       "copy_dice_std": sample_std(copy),
                       "n_folds": int(defined.sum())}
    return {"folds": sorted(r["eval_fold"] for r in results), "classes": table,
            "provenance": [fold_provenance(r) for r in sorted(results, key=lambda r: r["eval_fold"])]}


def fold_provenance(result: dict) -> dict:
    """What made one fold's numbers, from its results.json (entries it lacks are left out)."""
    provenance = result.get("provenance") or {}
    checkpoint, data = provenance.get("checkpoint") or {}, provenance.get("data") or {}
    entry = {"eval_fold": result["eval_fold"], "results": result.get("_path"),
             "git": (provenance.get("code") or {}).get("git"), "checkpoint": checkpoint.get("path"),
             "checkpoint_sha256": checkpoint.get("sha256"), "step": checkpoint.get("step"),
             "weights": checkpoint.get("weights"), "data_sha256": data.get("sha256")}
    return {key: value for key, value in entry.items() if value is not None}


def check_same_recipe(group: str, results: list[dict]) -> str | None:
    """Why the folds of a group must not be averaged, or None.

    Every fold's training config (``provenance.training_config``) must agree with the first one's in every
    training-relevant key but ``eval_fold``. A group where no file records a training config (results files
    written without ``provenance.training_config``) is not checked; one where only some do is refused.
    """
    configs = [(r["_path"], (r.get("provenance") or {}).get("training_config")) for r in results]
    missing = [path for path, cfg in configs if not isinstance(cfg, dict)]
    if len(missing) == len(configs):
        print(f"warning: {group}: no results file records its training config; folds not compared", file=sys.stderr)
        return None
    if missing:
        return f"{missing[0]} records no training config, so its fold cannot be compared with the others of {group}"
    (first_path, first), rest = configs[0], configs[1:]
    for path, cfg in rest:
        differences = training_differences(first, cfg, ignore=("eval_fold",))
        if differences:
            return (f"{group}: the folds were trained with different configs: "
                    f"{format_differences(differences, first_path, path)}")
    return None




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding <experiment>/results/results.json")
    parser.add_argument("--allow-mixed", action="store_true", help="average folds even when their training configs "
                                                                   "differ (the summary lists each fold's provenance)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    groups = collect(args.root)
    if not groups:
        print(f"error: no */results/results.json under {args.root}; run test.py first", file=sys.stderr)
        return 2
    for group, results in sorted(groups.items()):
        problem = check_same_recipe(group, results)
        if problem and not args.allow_mixed:
            print(f"error: {problem} (--allow-mixed averages them anyway)", file=sys.stderr)
            return 2
    summary = {group: summarize_group(results) for group, results in sorted(groups.items())}
    rows = []
    for group, entry in summary.items():
        print(f"\n{group}  (folds {entry['folds']})")
        print(f"{'class':<16}{'Dice (mean +- std)':>22}{'copy Dice (mean +- std)':>27}")
        for name, stats in entry["classes"].items():
            print(f"{name:<16}{stats['dice_mean']:>13.4f} +- {stats['dice_std']:.4f}"
                  f"{stats['copy_dice_mean']:>18.4f} +- {stats['copy_dice_std']:.4f}")
            rows.append([group, name, stats["dice_mean"], stats["dice_std"], stats["copy_dice_mean"],
                         stats["copy_dice_std"], stats["n_folds"]])
    (args.root / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(args.root / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "class", "dice_mean", "dice_std", "copy_dice_mean", "copy_dice_std", "n_folds"])
        writer.writerows(rows)
    print(f"\nsummary: {args.root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
