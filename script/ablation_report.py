"""Table and pictures of a de-biasing ablation (``script/ablation.sh``).

    python script/ablation_report.py runs/ablation

Reads every ``<dataset>_setting<s>_fold<f>_<mode>[_<recipe>]`` run below the folder: ``results/results.json`` (the
final weights), ``snapshot_results/step_<n>/results.json`` and the Sacred ``train/*/metrics.json``.
Writes into the folder:

- ``ablation.md`` / ``ablation.csv``: Dice per organ and the mean for every (fold, arm), the
  copy-the-support baseline of the same evaluation, and, over several folds, the mean over folds of each
  arm (only folds that every listed arm has);
- ``curves_fold<f>.png``: loss (moving average), threshold xi and kept fraction of support pixels against
  step, one line per arm;
- ``dice_vs_step.png``: mean Dice of the snapshots and final weights against step, one line per (fold, arm).
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

# config.experiment_name: the recipe (named configs and digest) and the tag may follow the mode
RUN_PATTERN = re.compile(r"^(?P<dataset>\w+?)_setting(?P<setting>\d)_fold(?P<fold>\d+)_(?P<mode>learned|fixed|off)"
                         r"(?:_.+)?$")
MODES = ("learned", "fixed", "off")
CURVES = (("loss", "focal loss (moving average of 10 logs)"), ("xi", "threshold xi (learned, fixed)"),
          ("kept_fraction", "kept fraction of support pixels (moving average)"))
LAST_N = 3  # the table also gives the mean Dice of the last LAST_N evaluated checkpoints: one snapshot is noisy


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def final_step(run: Path) -> int | None:
    """Step of the final weights, from the last logged training step (None without metrics)."""
    steps = [s for m in train_metrics(run).values() for s in m[0]]
    return max(steps) if steps else None


def train_metrics(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Scalars of all Sacred training runs of ``run`` (a resumed run has several), merged by step."""
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(run.glob("train/*/metrics.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        for name, series in read_json(path).items():
            merged[name].update(zip(series["steps"], series["values"]))
    return {name: (sorted(v), [v[s] for s in sorted(v)]) for name, v in merged.items()}


def collect(root: Path) -> list[dict]:
    """One record per evaluated run: fold, mode, per-class and mean Dice of the model and the baseline."""
    records = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        match = RUN_PATTERN.match(run.name)
        results = run / "results" / "results.json"
        if not match or not results.is_file():
            continue
        summary = read_json(results)
        snapshots = []
        for path in run.glob("snapshot_results/step_*/results.json"):
            step = int(path.parent.name.split("_")[1])
            snapshots.append((step, read_json(path)["mean"]["model"]["dice"]))
        last = final_step(run)
        if last is not None:
            snapshots.append((last, summary["mean"]["model"]["dice"]))
        records.append({
            "run": run, "dataset": match["dataset"], "setting": int(match["setting"]),
            "fold": int(match["fold"]), "mode": match["mode"], "classes": list(summary["classes"]),
            "model": {name: c["model"]["dice"] for name, c in summary["classes"].items()},
            "copy": {name: c["copy_support"]["dice"] for name, c in summary["classes"].items()},
            "mean": summary["mean"]["model"]["dice"], "copy_mean": summary["mean"]["copy_support"]["dice"],
            "precision": summary["mean"]["model"]["precision"], "recall": summary["mean"]["model"]["recall"],
            "support_id": summary["supports"][0]["support_id"], "snapshots": sorted(snapshots), "step": last,
            "last_mean": last_n_mean(sorted(snapshots)),
        })
    return records


def last_n_mean(snapshots: list[tuple[int, float]], n: int = LAST_N) -> float | None:
    """Mean Dice of the ``n`` latest (step, Dice) evaluations; None with fewer than ``n``."""
    if len(snapshots) < n:
        return None
    return float(np.mean([dice for _, dice in sorted(snapshots)[-n:]]))


def table_rows(records: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: per fold the arms then the baseline; then the mean over folds when several."""
    classes = records[0]["classes"]
    header = ["fold", "arm", "steps", *classes, "mean", f"mean of last {LAST_N} checkpoints", "precision", "recall"]
    rows = []
    by_fold: dict[int, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        by_fold[rec["fold"]][rec["mode"]] = rec
    for fold in sorted(by_fold):
        arms = by_fold[fold]
        for mode in MODES:
            if mode in arms:
                r = arms[mode]
                last = "" if r["last_mean"] is None else r["last_mean"]
                rows.append([fold, mode, r["step"], *(r["model"][c] for c in classes), r["mean"], last,
                             r["precision"], r["recall"]])
        base = next(iter(arms.values()))
        rows.append([fold, "copy-the-support", "", *(base["copy"][c] for c in classes), base["copy_mean"], "", "", ""])
    if len(by_fold) > 1:
        for mode in (*MODES, "copy-the-support"):
            folds = [f for f in sorted(by_fold) if (mode in by_fold[f] if mode != "copy-the-support" else True)]
            if len(folds) < 2:
                continue
            picked = [by_fold[f][mode] if mode in MODES else next(iter(by_fold[f].values())) for f in folds]
            key, mean_key = ("model", "mean") if mode in MODES else ("copy", "copy_mean")
            rows.append([f"mean of {len(folds)} folds ({' '.join(map(str, folds))})", mode, "",
                         *(float(np.mean([p[key][c] for p in picked])) for c in classes),
                         float(np.mean([p[mean_key] for p in picked])), "", "", ""])
    return header, rows


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_tables(header: list[str], rows: list[list], root: Path) -> tuple[Path, Path]:
    md, csv_path = root / "ablation.md", root / "ablation.csv"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in rows])
    return md, csv_path


def moving_average(values: list[float], n: int = 10) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < n:
        return values
    return np.convolve(values, np.ones(n) / n, mode="valid")


def plot(records: list[dict], root: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = {"learned": "tab:blue", "fixed": "tab:orange", "off": "tab:green"}
    for fold in sorted({r["fold"] for r in records}):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for rec in (r for r in records if r["fold"] == fold):
            metrics = train_metrics(rec["run"])
            for ax, (name, title) in zip(axes, CURVES):
                if name not in metrics:
                    continue
                if name == "xi" and rec["mode"] == "off":
                    continue  # plain MAP logs the sentinel -1: no threshold
                steps, values = metrics[name]
                if name != "xi":
                    values = moving_average(values)
                    steps = steps[len(steps) - len(values):]
                ax.plot(steps, values, label=rec["mode"], color=colours[rec["mode"]], lw=1.2)
                ax.set_title(title, fontsize=10)
                ax.set_xlabel("step")
        axes[0].legend()
        fig.suptitle(f"{records[0]['dataset']} setting {records[0]['setting']}, fold {fold}: training curves", fontsize=11)
        fig.tight_layout()
        path = root / f"curves_fold{fold}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = ["-", "--", ":", "-."]
    for rec in records:
        if rec["snapshots"]:
            steps, dice = zip(*rec["snapshots"])
            ax.plot(steps, dice, marker="o", ms=3, color=colours[rec["mode"]], ls=styles[rec["fold"] % len(styles)],
                    label=f"fold {rec['fold']} {rec['mode']}")
    for fold in sorted({r["fold"] for r in records}):
        base = next(r for r in records if r["fold"] == fold)
        ax.axhline(base["copy_mean"], color="grey", lw=0.8, ls=styles[fold % len(styles)])
    ax.set_xlabel("training step")
    ax.set_ylabel("mean Dice (EP1)")
    ax.set_title("mean Dice against step (grey: copy-the-support baseline)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = root / "dice_vs_step.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the ablation's log folder")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    records = collect(args.root)
    if not records:
        print(f"error: no evaluated run (<dataset>_setting<s>_fold<f>_<mode>/results/results.json) in {args.root}",
              file=sys.stderr)
        return 2
    header, rows = table_rows(records)
    md, csv_path = write_tables(header, rows, args.root)
    print(md.read_text(), end="")
    written = [md, csv_path] + ([] if args.no_plots else plot(records, args.root))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
