"""Aggregate per-fold ``results.json`` files into a mean +- std table per organ.

    python script/summarize.py runs            # every <experiment>/results/results.json below runs/

Runs are grouped by experiment name without its fold (e.g. ``CHAOST2_setting1_learned``); for each group
the Dice of each organ is averaged over folds (mean +- standard deviation over folds), beside the
copy-the-support baseline. Writes ``summary.json`` and ``summary.csv`` in the folder given.
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
    """Mean and population standard deviation over folds of each class's Dice (model and copy baseline)."""
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
                       "dice_std": float(np.std(model)) if model.size else float("nan"),
                       "copy_dice_mean": float(np.mean(copy)) if copy.size else float("nan"),
                       "n_folds": int(defined.sum())}
    return {"folds": sorted(r["eval_fold"] for r in results), "classes": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding <experiment>/results/results.json")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    groups = collect(args.root)
    if not groups:
        print(f"error: no */results/results.json under {args.root}; run test.py first", file=sys.stderr)
        return 2
    summary = {group: summarize_group(results) for group, results in sorted(groups.items())}
    rows = []
    for group, entry in summary.items():
        print(f"\n{group}  (folds {entry['folds']})")
        print(f"{'class':<16}{'Dice (mean +- std)':>22}{'copy Dice':>11}")
        for name, stats in entry["classes"].items():
            print(f"{name:<16}{stats['dice_mean']:>13.4f} +- {stats['dice_std']:.4f}{stats['copy_dice_mean']:>11.4f}")
            rows.append([group, name, stats["dice_mean"], stats["dice_std"], stats["copy_dice_mean"], stats["n_folds"]])
    (args.root / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(args.root / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "class", "dice_mean", "dice_std", "copy_dice_mean", "n_folds"])
        writer.writerows(rows)
    print(f"\nsummary: {args.root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
