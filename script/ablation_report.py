"""Table and pictures of an ablation or a comparison of methods (``script/ablation.sh``).

    python script/ablation_report.py runs/ablation
    python script/ablation_report.py runs/r5 --earlier docs/evidence/step_average/ablation.csv
    python script/ablation_report.py runs/r5 --folds 0 1 2 --seeds config --out runs/r5/equal_footing

``--earlier`` adds the runs of an earlier report's ``ablation.csv`` (same recipe and evaluation, run folders
no longer at hand, e.g. made on another machine) to the tables and paired differences: its rows carry each
run's Dice, steps, last-three mean, precision and recall and each fold's copy-the-support baseline, but no
curves, parameters or training time, so the pictures, ``dice_by_step.md`` and those two columns cover only
the run folders. A run folder replaces an earlier row of the same (fold, arm, seed); a fold whose baseline
differs between the sources (another support or evaluation) is refused.

Reads every ``<dataset>_setting<s>_fold<f>_<arm>[_<recipe>][_seed<k>]`` run below the folder (the folder
names of ``config.experiment_name``): ``results/results.json`` (the final weights),
``snapshot_results/step_<n>/results.json`` and the Sacred ``train/*/metrics.json`` and ``train/*/run.json``.

An arm is named by its DMAP mode for ``model.method=dmap`` (``learned``, ``learned_st``, ``fixed``, ``off``;
``off`` is plain masked average pooling) and by the method for any other (``adnet``, ``qnet``, ``alpnet``),
as the run folders are named; a method whose pooling is switched to ``dmap`` is ``<method>-<mode>``
(``adnet-learned``). The arm and the seed come from the training config that ``results.json``
records (``provenance.training_config``: ``model.method``, ``model.dmap_mode``, ``seed``), else from the
folder's name. The arms of one folder are assumed to share the recipe otherwise (``script/ablation.sh``).
``--folds`` and ``--seeds`` keep only the runs of those folds and seeds (``config``: the config's seed), so
that every arm of a table stands on the same folds and seeds; ``--out`` writes elsewhere than the folder.
Writes into the folder:

- ``ablation.md`` / ``ablation.csv``: Dice per organ and the mean for every (fold, arm, seed), the
  copy-the-support baseline of the same evaluation, and, over several folds, the mean over folds of each
  arm (only folds that every listed arm has);
- ``summary.md``: per arm the mean +- standard deviation over its runs (folds x seeds) of every organ's
  Dice and the mean, the model's trainable parameters (built on the CPU from the recorded training config,
  no data needed) and the training wall time (start to stop of the Sacred training runs, summed over a
  run's resumptions; mean +- std over the runs), with the copy-the-support baseline; for each pair of arms
  the paired difference of the mean Dice (runs matched on fold and seed) with a 95 % bootstrap interval, a
  95 % Student-t interval and the number of pairs (with few pairs the percentile bootstrap cannot reach
  beyond the observed differences and is too narrow; the t interval is the honest one there);
- ``curves_fold<f>.png``: training loss (moving average), threshold xi and kept fraction of support pixels
  (arms that de-bias only), predicted foreground fraction and the probability offset (mean tau, or ADNet's
  learned T) against step, one line per arm;
- ``dice_by_step.md``: per run, how still its end is (final mean Dice, the mean and the lowest of the last
  three checkpoints, final minus that mean; for the raw weights too when ``RAW_TOO=1`` scored them) and the
  mean Dice (and recall) at every evaluated step;
- ``dice_vs_step.png``: mean Dice of the snapshots and final weights against step, one line per (fold, arm).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import warnings
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from evaluation.scores import sample_std  # noqa: E402

MODES = ("learned", "learned_st", "fixed", "off")  # DMAP's arms: model.dmap_mode
METHOD_ARMS = ("adnet", "qnet", "alpnet")  # the other methods' arms: model.method
ARMS = (*MODES, *METHOD_ARMS)  # the order of arms in tables and pictures
# config.experiment_name: the recipe (named configs and digest) and the tag may follow the arm
RUN_PATTERN = re.compile(r"^(?P<dataset>\w+?)_setting(?P<setting>\d)_fold(?P<fold>\d+)_"
                         rf"(?P<mode>{'|'.join(sorted(ARMS, key=len, reverse=True))})(?P<rest>_.+)?$")
SEED_TAG = re.compile(r"_seed(?P<seed>\d+)$")
DEBIASED_CURVES = ("xi", "kept_fraction")  # logged as -1 and 1 by arms without de-biasing: not drawn for them
CURVES = (("loss", "training loss (moving average of 10 logs)"), ("xi", "threshold xi (de-biasing arms)"),
          ("kept_fraction", "kept fraction of support pixels (moving average)"),
          ("pred_fg_fraction", "predicted foreground fraction of the query (moving average)"),
          ("offset", "probability offset: tau (query mean) or ADNet's T"))
# the "offset" curve: the scalar a run logs for the offset of its foreground probability, first found wins
OFFSET_SCALARS = ("threshold", "tau")
COLOURS = {"learned": "tab:blue", "learned_st": "tab:purple", "fixed": "tab:orange", "off": "tab:green",
           "adnet": "tab:red", "qnet": "tab:brown", "alpnet": "tab:pink"}
LAST_N = 3  # the table also gives the mean Dice of the last LAST_N evaluated checkpoints: one snapshot is noisy
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0


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


def offset_series(metrics: Mapping[str, tuple[list[int], list[float]]]) -> tuple[list[int], list[float]] | None:
    """The offset of the foreground probability a run logged (:data:`OFFSET_SCALARS`): ADNet's learned scalar
    T (``threshold``), else the batch mean of the per-query tau; None for a run with neither (ALPNet).

    Both run away to large negative values in an all-background collapse, so the curve shows it coming.
    """
    return next((metrics[name] for name in OFFSET_SCALARS if name in metrics), None)


def arm_order(arm: str) -> tuple[int, str]:
    """Sort key of an arm: the order of :data:`ARMS`, then any other name alphabetically."""
    return (ARMS.index(arm), "") if arm in ARMS else (len(ARMS), arm)


def arms_of(records: list[dict]) -> list[str]:
    """The arms the records have, in :func:`arm_order`."""
    return sorted({r["mode"] for r in records}, key=arm_order)


def arm_name(model: Mapping[str, Any], fallback: str | None = None) -> str | None:
    """The arm of a ``model`` config sub-dict: its ``dmap_mode`` for the DMAP method (a config without
    ``method`` is DMAP), else its ``method`` -- ``<method>-<dmap_mode>`` when that method's pooling is switched
    to ``dmap`` (the mode then matters); ``fallback`` for a DMAP config without ``dmap_mode``."""
    method = model.get("method") or "dmap"
    mode = model.get("dmap_mode")
    if method != "dmap":
        return f"{method}-{mode or 'learned'}" if model.get("pooling") == "dmap" else str(method)
    return fallback if mode is None else str(mode)


def method_of(model: Mapping[str, Any] | None, arm: str) -> str:
    """The method of a run: its ``model`` config sub-dict's ``method`` (default ``dmap``); from the arm
    without a config (a DMAP mode is ``dmap``, any other arm names its method)."""
    if isinstance(model, Mapping):
        return model.get("method") or "dmap"
    return "dmap" if arm in MODES else arm


def debiases(model: Mapping[str, Any] | None, arm: str) -> bool:
    """Whether a run de-biases its prototype (logs a real threshold xi and kept fraction): ``dmap`` pooling
    (the DMAP method's, or a component switched to it) outside mode ``off``; from the arm without a config."""
    if not isinstance(model, Mapping):
        return arm in MODES and arm != "off"
    pooling = model.get("pooling") or ("dmap" if (model.get("method") or "dmap") == "dmap" else None)
    return pooling == "dmap" and model.get("dmap_mode", "learned") != "off"


_PARAMETER_CACHE: dict[str, int | None] = {}


def model_parameters(model: Mapping[str, Any]) -> int | None:
    """Trainable parameters of the model a ``model`` config sub-dict describes (None: no model).

    The model is built on the CPU with random weights (``weights_path`` ignored: no file or data is read)
    by ``FewShotSeg.from_config``, as training builds it; the count leaves frozen parts out
    (``models.fewshot.trainable_parameter_count``). Built once per distinct config.
    """
    key = json.dumps(model, sort_keys=True, default=str)
    if key not in _PARAMETER_CACHE:
        try:
            from models.fewshot import FewShotSeg, trainable_parameter_count

            with warnings.catch_warnings():  # "randomly initialised": on purpose here
                warnings.simplefilter("ignore")
                _PARAMETER_CACHE[key] = trainable_parameter_count(FewShotSeg.from_config(dict(model, weights_path="")))
        except (ImportError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            print(f"warning: no parameter count for model config {key[:200]}: {exc}", file=sys.stderr)
            _PARAMETER_CACHE[key] = None
    return _PARAMETER_CACHE[key]


def training_minutes(run: Path) -> float | None:
    """Training wall time of ``run`` in minutes: stop (or last heartbeat) minus start of each Sacred
    ``train/*/run.json``, summed over the run's resumptions; None without a readable one."""
    total, found = 0.0, False
    for path in run.glob("train/*/run.json"):
        try:
            info = read_json(path)
            end = info.get("stop_time") or info.get("heartbeat")
            seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(info["start_time"])).total_seconds()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        total, found = total + max(seconds, 0.0), True
    return total / 60.0 if found else None


def collect(root: Path, parameters: bool = True) -> list[dict]:
    """One record per evaluated run: fold, arm (key ``mode``: a DMAP mode or a method), seed, per-class and
    mean Dice of the model and the baseline, trainable parameters (``parameters``: build the model) and
    training minutes."""
    records = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        match = RUN_PATTERN.match(run.name)
        results = run / "results" / "results.json"
        if not match or not results.is_file():
            continue
        summary = read_json(results)
        last = final_step(run)
        snapshots, recalls = snapshot_curve(run, "", summary, last)
        raw_final = run / "results_raw" / "results.json"
        raw_snapshots, raw_recalls = snapshot_curve(run, "_raw", read_json(raw_final) if raw_final.is_file() else None,
                                                    last)
        mode, seed = run_arm_and_seed(summary, match)
        trained = summary.get("provenance", {}).get("training_config")
        model = trained.get("model") if isinstance(trained, dict) and isinstance(trained.get("model"), dict) else None
        records.append({
            "run": run, "dataset": match["dataset"], "setting": int(match["setting"]),
            "fold": int(match["fold"]), "mode": mode, "classes": list(summary["classes"]), "seed": seed,
            "model": {name: c["model"]["dice"] for name, c in summary["classes"].items()},
            "copy": {name: c["copy_support"]["dice"] for name, c in summary["classes"].items()},
            "mean": summary["mean"]["model"]["dice"], "copy_mean": summary["mean"]["copy_support"]["dice"],
            "precision": summary["mean"]["model"]["precision"], "recall": summary["mean"]["model"]["recall"],
            "support_id": summary["supports"][0]["support_id"], "snapshots": sorted(snapshots), "step": last,
            "raw_snapshots": sorted(raw_snapshots), "weights": summary.get("weights", "raw"),
            "recalls": recalls, "raw_recalls": raw_recalls,
            "last_mean": last_n_mean(sorted(snapshots)),
            "method": method_of(model, mode),
            "debiased": debiases(model, mode),
            "params": model_parameters(model) if parameters and model else None,
            "train_min": training_minutes(run),
        })
    return records


class EarlierTableError(Exception):
    """An ``--earlier`` table that cannot be read or does not match the run folders' evaluation."""


BASELINE_TOLERANCE = 5e-4  # the CSV rounds to 4 decimals: the same evaluation agrees to within its rounding


def read_earlier(path: Path) -> list[dict]:
    """Records (as :func:`collect` makes them, without run folder, curves, parameters or time) from the
    per-run rows of an earlier report's ``ablation.csv``; the copy-the-support row of each fold gives its
    runs' baseline. Rows of means over folds are skipped.

    Raises:
        EarlierTableError: the file is missing, lacks a column, has a run without its fold's baseline or a
            value that is not a number.
    """
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except OSError as exc:
        raise EarlierTableError(f"--earlier {path}: cannot read ({exc.strerror})") from None
    needed = ("fold", "arm", "steps", "mean", "precision", "recall")
    missing = [c for c in needed if c not in header]
    if not rows or missing:
        raise EarlierTableError(f"--earlier {path}: expected an ablation.csv with columns {', '.join(needed)}, "
                                f"the classes and 'mean of last {LAST_N} checkpoints'"
                                + (f"; missing {', '.join(missing)}" if missing else "; it has no rows"))
    names = list(header)
    classes = names[names.index("steps") + 1:names.index("mean")]
    last_key = f"mean of last {LAST_N} checkpoints"
    try:
        baselines = {int(r["fold"]): {c: float(r[c]) for c in classes} | {"_mean": float(r["mean"])}
                     for r in rows if r["arm"] == "copy-the-support" and r["fold"].isdigit()}
        records = []
        for r in rows:
            if not r["fold"].isdigit() or r["arm"] == "copy-the-support":
                continue  # "mean of N folds" rows
            fold = int(r["fold"])
            if fold not in baselines:
                raise EarlierTableError(f"--earlier {path}: fold {fold} has runs but no copy-the-support row")
            copy = dict(baselines[fold])
            copy_mean = copy.pop("_mean")
            seed = r.get("seed") or "config"
            records.append({
                "run": None, "source": str(path), "dataset": None, "setting": None, "fold": fold,
                "mode": r["arm"], "classes": classes, "seed": None if seed == "config" else int(seed),
                "model": {c: float(r[c]) for c in classes}, "copy": copy, "mean": float(r["mean"]),
                "copy_mean": copy_mean, "precision": float(r["precision"]), "recall": float(r["recall"]),
                "support_id": None, "snapshots": [], "step": int(r["steps"]), "raw_snapshots": [],
                "weights": None, "recalls": {}, "raw_recalls": {},
                "last_mean": float(r[last_key]) if r.get(last_key) else None,
                "method": method_of(None, r["arm"]), "debiased": debiases(None, r["arm"]),
                "params": None, "train_min": None})
    except ValueError as exc:
        raise EarlierTableError(f"--earlier {path}: a value is not a number ({exc})") from None
    return records


def from_earlier(rec: dict) -> bool:
    """Whether a record was read from an earlier report's table (it has no run folder, curves or timings)."""
    return rec.get("source") is not None


def select(records: list[dict], folds: list[int] | None = None, seeds: list[str] | None = None) -> list[dict]:
    """The records of the given folds and seeds (None: all); a seed is a number or ``config`` (the config's
    seed, recorded as None)."""
    wanted = None if seeds is None else {None if s == "config" else int(s) for s in seeds}
    return [r for r in records
            if (folds is None or r["fold"] in folds) and (wanted is None or r["seed"] in wanted)]


def merge_earlier(records: list[dict], earlier: list[dict]) -> list[dict]:
    """The run-folder ``records`` and the ``earlier`` ones of (fold, arm, seed) that no run folder has.

    Raises:
        EarlierTableError: the classes differ, or a fold's copy-the-support baseline differs between the
            sources by more than the CSV's rounding (the runs were not evaluated alike).
    """
    merged = list(records)
    have = {(r["fold"], r["mode"], r["seed"]) for r in records}
    baseline = {r["fold"]: (r["copy_mean"], r.get("source") or str(r["run"])) for r in records}
    for rec in earlier:
        if merged and rec["classes"] != merged[0]["classes"]:
            raise EarlierTableError(f"--earlier {rec['source']}: classes {', '.join(rec['classes'])}, expected "
                                    f"{', '.join(merged[0]['classes'])}")
        known = baseline.setdefault(rec["fold"], (rec["copy_mean"], rec["source"]))
        if abs(known[0] - rec["copy_mean"]) > BASELINE_TOLERANCE:
            raise EarlierTableError(f"--earlier {rec['source']}: fold {rec['fold']}'s copy-the-support Dice is "
                                    f"{rec['copy_mean']:.4f}, {known[0]:.4f} in {known[1]}: not the same "
                                    "evaluation")
        if (rec["fold"], rec["mode"], rec["seed"]) not in have:
            have.add((rec["fold"], rec["mode"], rec["seed"]))
            merged.append(rec)
    return merged


def snapshot_curve(run: Path, suffix: str, final: dict | None,
                   last: int | None) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """(step, mean Dice) of ``snapshot_results<suffix>/step_<n>`` and of the final weights' results, and
    the mean recall at the steps whose results record it (a low recall tells under-segmentation)."""
    scores = []
    for path in run.glob(f"snapshot_results{suffix}/step_*/results.json"):
        scores.append((int(path.parent.name.split("_")[1]), read_json(path)["mean"]["model"]))
    if last is not None and final is not None:
        scores.append((last, final["mean"]["model"]))
    curve = [(step, mean["dice"]) for step, mean in scores]
    return curve, {step: mean["recall"] for step, mean in scores if mean.get("recall") is not None}


def run_arm_and_seed(summary: dict, match: re.Match) -> tuple[str, int | None]:
    """The arm (:func:`arm_name`) and the seed of a run: from the training config its results record,
    else from the folder name (the seed only when the folder ends with ``_seed<k>``, as the sweep names it)."""
    trained = summary.get("provenance", {}).get("training_config")
    tagged = SEED_TAG.search(match["rest"] or "")
    if isinstance(trained, dict) and isinstance(trained.get("model"), dict):
        seed = trained.get("seed") if tagged or trained.get("tag") else None
        return arm_name(trained["model"], match["mode"]), None if seed is None else int(seed)
    return match["mode"], None if tagged is None else int(tagged["seed"])


def last_n_mean(snapshots: list[tuple[int, float]], n: int = LAST_N) -> float | None:
    """Mean Dice of the ``n`` latest (step, Dice) evaluations; None with fewer than ``n``."""
    still = stability(snapshots, n)
    return None if still is None else still["last_mean"]


def table_rows(records: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: per fold the arms then the baseline; then the mean over folds when several."""
    classes = records[0]["classes"]
    seeded = any(r["seed"] is not None for r in records)
    header = ["fold", "arm", *(["seed"] if seeded else []), "steps", *classes, "mean",
              f"mean of last {LAST_N} checkpoints", "precision", "recall"]
    rows = []
    by_fold: dict[int, dict[str, dict]] = defaultdict(dict)
    runs_by_fold: dict[int, list[dict]] = defaultdict(list)
    for rec in records:
        by_fold[rec["fold"]].setdefault(rec["mode"], rec)
        runs_by_fold[rec["fold"]].append(rec)
    pad = [""] if seeded else []
    for fold in sorted(by_fold):
        arms = by_fold[fold]
        for r in sorted(runs_by_fold[fold], key=lambda r: (arm_order(r["mode"]), r["seed"] or 0)):
            last = "" if r["last_mean"] is None else r["last_mean"]
            seed = [seed_name(r["seed"])] if seeded else []
            rows.append([fold, r["mode"], *seed, r["step"], *(r["model"][c] for c in classes), r["mean"], last,
                         r["precision"], r["recall"]])
        base = next(iter(arms.values()))
        rows.append([fold, "copy-the-support", *pad, "", *(base["copy"][c] for c in classes), base["copy_mean"], "", "",
                     ""])
    if len(by_fold) > 1 and not seeded:  # seeded sweeps: summary.md gives the means over folds and seeds
        arms = arms_of(records)
        for mode in (*arms, "copy-the-support"):
            folds = [f for f in sorted(by_fold) if (mode in by_fold[f] if mode != "copy-the-support" else True)]
            if len(folds) < 2:
                continue
            picked = [by_fold[f][mode] if mode in arms else next(iter(by_fold[f].values())) for f in folds]
            key, mean_key = ("model", "mean") if mode in arms else ("copy", "copy_mean")
            rows.append([f"mean of {len(folds)} folds ({' '.join(map(str, folds))})", mode, *pad, "",
                         *(float(np.mean([p[key][c] for p in picked])) for c in classes),
                         float(np.mean([p[mean_key] for p in picked])), "", "", ""])
    return header, rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``evaluation.scores.sample_std``; 0 for a single value)."""
    return float(np.mean(values)), sample_std(values)


def arm_summary(records: list[dict]) -> list[dict]:
    """Per arm: mean +- std over its runs (folds x seeds) of each organ's Dice and of the mean Dice, the
    trainable parameters (``params``: the distinct counts of its runs) and the training minutes
    (``train_min``: mean +- std over the runs that have them, None when none has).

    The copy-the-support baseline does not depend on the arm or the seed, so it is averaged over the folds
    (one value per fold).
    """
    classes = records[0]["classes"]
    out = []
    for mode in arms_of(records):
        runs = [r for r in records if r["mode"] == mode]
        minutes = [r["train_min"] for r in runs if r.get("train_min") is not None]
        out.append({"arm": mode, "n": len(runs), "folds": sorted({r["fold"] for r in runs}),
                    # the config's seed (None) first
                    "seeds": sorted({r["seed"] for r in runs}, key=lambda seed: -1 if seed is None else seed),
                    "classes": {c: mean_std([r["model"][c] for r in runs]) for c in classes},
                    "mean": mean_std([r["mean"] for r in runs]),
                    "params": sorted({r["params"] for r in runs if r.get("params") is not None}),
                    "train_min": mean_std(minutes) if minutes else None})
    per_fold = {r["fold"]: r for r in records}
    out.append({"arm": "copy-the-support", "n": len(per_fold), "folds": sorted(per_fold), "seeds": [],
                "classes": {c: mean_std([r["copy"][c] for r in per_fold.values()]) for c in classes},
                "mean": mean_std([r["copy_mean"] for r in per_fold.values()]), "params": [], "train_min": None})
    return out


def bootstrap_ci(differences: list[float], level: float = CI_LEVEL, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of paired differences (None for fewer than two pairs)."""
    if len(differences) < 2:
        return None
    from scipy.stats import bootstrap

    result = bootstrap((np.asarray(differences, dtype=float),), np.mean, confidence_level=level,
                       n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def t_ci(differences: list[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean of paired differences: mean +- t_(n-1) * sd / sqrt(n), sd with n - 1
    (None for fewer than two pairs). Unlike the percentile bootstrap it widens honestly when pairs are few."""
    if len(differences) < 2:
        return None
    from scipy.stats import t

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    half = float(t.ppf(0.5 + level / 2, df=len(values) - 1)) * float(values.std(ddof=1)) / np.sqrt(len(values))
    return mean - half, mean + half


def paired_differences(records: list[dict], arm_a: str, arm_b: str) -> dict | None:
    """Mean Dice of ``arm_a`` minus ``arm_b`` over runs matched on (fold, seed), with its bootstrap and t
    intervals.

    Returns:
        ``{"a", "b", "n", "pairs": [(fold, seed, diff)], "mean", "ci": (low, high) | None, "t_ci": (low, high)
        | None}``; None when no (fold, seed) has both arms.
    """
    a = {(r["fold"], r["seed"]): r["mean"] for r in records if r["mode"] == arm_a}
    b = {(r["fold"], r["seed"]): r["mean"] for r in records if r["mode"] == arm_b}
    keys = sorted(set(a) & set(b), key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    if not keys:
        return None
    diffs = [a[k] - b[k] for k in keys]
    return {"a": arm_a, "b": arm_b, "n": len(keys), "pairs": [(f, s, d) for (f, s), d in zip(keys, diffs)],
            "mean": float(np.mean(diffs)), "ci": bootstrap_ci(diffs), "t_ci": t_ci(diffs)}


def seed_name(seed: int | None) -> str | int:
    """A run's seed as the tables print it: ``config`` for a run without a seed tag (the config's seed)."""
    return "config" if seed is None else seed


def seeds_cell(row: dict) -> str:
    """The seeds of an ``arm_summary`` row as the summary prints them (``-`` for the baseline)."""
    return " ".join(str(seed_name(seed)) for seed in row["seeds"]) or "-"


def summary_markdown(records: list[dict]) -> str:
    """``summary.md``: the per-arm table and the paired differences of every pair of arms."""
    classes = records[0]["classes"]
    lines = ["| arm | runs | folds | seeds | " + " | ".join(classes) + " | mean | params (M) | train time (min) |",
             "|" + "---|" * (len(classes) + 7)]
    for row in arm_summary(records):
        cells = [f"{m:.3f} +- {sd:.3f}" for m, sd in (row["classes"][c] for c in classes)]
        m, sd = row["mean"]
        params = " / ".join(f"{p / 1e6:.2f}" for p in row["params"]) or "-"
        minutes = "-" if row["train_min"] is None else f"{row['train_min'][0]:.1f} +- {row['train_min'][1]:.1f}"
        lines.append(f"| {row['arm']} | {row['n']} | {' '.join(map(str, row['folds']))} | "
                     f"{seeds_cell(row)} | " + " | ".join(cells) + f" | {m:.3f} +- {sd:.3f} |"
                     f" {params} | {minutes} |")
    modes = arms_of(records)
    pairs = [paired_differences(records, a, b) for i, a in enumerate(modes) for b in modes[i + 1:]]
    pairs = [p for p in pairs if p is not None]
    if pairs:
        lines += ["", f"Paired differences of the mean Dice (same fold, same seed; {CI_LEVEL:.0%} percentile "
                      f"bootstrap over the pairs, {BOOTSTRAP_RESAMPLES} resamples, and {CI_LEVEL:.0%} Student-t "
                      "interval; with few pairs the bootstrap cannot reach beyond the observed differences, so "
                      "read the t interval):", "",
                  "| difference | mean | 95% CI (bootstrap) | 95% CI (t) | pairs |", "|---|---|---|---|---|"]

        def interval(ci: tuple[float, float] | None) -> str:
            return "n/a (one pair)" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"

        for p in pairs:
            lines.append(f"| {p['a']} - {p['b']} | {p['mean']:+.3f} | {interval(p['ci'])} | {interval(p['t_ci'])} |"
                         f" {p['n']} |")
    earlier = sorted({r["source"] for r in records if from_earlier(r)})
    if earlier:
        n = sum(from_earlier(r) for r in records)
        lines += ["", f"{n} of the {len(records)} runs come from earlier tables ({', '.join(earlier)}); those "
                      "tables hold no parameters or training times, so these two columns cover the run folders "
                      "only."]
    return "\n".join(lines) + "\n"


def stability(curve: list[tuple[int, float]], n: int = LAST_N) -> dict | None:
    """How still the end of a (step, mean Dice) curve is: the final Dice, the mean and the lowest of the
    ``n`` latest evaluations, and the final minus that mean; None with fewer than ``n`` evaluations."""
    if len(curve) < n:
        return None
    last = [dice for _, dice in sorted(curve)[-n:]]
    final, mean = last[-1], float(np.mean(last))
    return {"final": final, "last_mean": mean, "last_min": min(last), "final_minus_last_mean": final - mean}


def run_label(rec: dict) -> str:
    return f"fold {rec['fold']} {rec['mode']}" + ("" if rec["seed"] is None else f" seed {rec['seed']}")


def dice_by_step_markdown(records: list[dict]) -> str:
    """``dice_by_step.md``: each run's stability (:func:`stability`) of the evaluated weights and, when
    scored, of the raw weights of the same checkpoints; then its mean Dice at every evaluated step."""
    lines = [f"How still the end of each run is: final mean Dice against the mean (and the lowest) of the last "
             f"{LAST_N} evaluated checkpoints.", "",
             "| run | weights | final | mean of last 3 | lowest of last 3 | final - mean of last 3 |",
             "|---|---|---|---|---|---|"]
    records = [r for r in records if not from_earlier(r)]  # earlier tables carry no curves
    for rec in records:
        curves = [(rec["weights"], rec["snapshots"])]
        if rec["raw_snapshots"] and rec["weights"] != "raw":
            curves.append(("raw", rec["raw_snapshots"]))
        for weights, curve in curves:
            s = stability(curve)
            cells = ["-"] * 4 if s is None else [f"{s['final']:.3f}", f"{s['last_mean']:.3f}",
                                                 f"{s['last_min']:.3f}", f"{s['final_minus_last_mean']:+.3f}"]
            lines.append(f"| {run_label(rec)} | {weights} | " + " | ".join(cells) + " |")
    lines += ["", "Mean Dice at every evaluated step, mean recall in brackets where recorded (the last step is the "
                  "final weights):", "",
              "| run | step | evaluated weights | raw weights |", "|---|---|---|---|"]

    def cell(dice: float | None, recall: float | None) -> str:
        if dice is None:
            return "-"
        return f"{dice:.3f}" + ("" if recall is None else f" (recall {recall:.2f})")

    for rec in records:
        raw = dict(rec["raw_snapshots"]) if rec["weights"] != "raw" else {}
        recalls, raw_recalls = rec.get("recalls", {}), rec.get("raw_recalls", {})
        for step, dice in sorted(rec["snapshots"]):
            lines.append(f"| {run_label(rec)} | {step} | {cell(dice, recalls.get(step))}, {rec['weights']} | "
                         f"{cell(raw.get(step), raw_recalls.get(step))} |")
    return "\n".join(lines) + "\n"


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
    spare = iter(["tab:olive", "tab:cyan", "tab:gray", "black"] * 8)
    colours = dict(COLOURS)
    for arm in arms_of(records):
        colours.setdefault(arm, next(spare))
    for fold in sorted({r["fold"] for r in records if not from_earlier(r)}):
        fig, axes = plt.subplots(1, len(CURVES), figsize=(4.3 * len(CURVES), 3.4))
        for rec in (r for r in records if r["fold"] == fold and not from_earlier(r)):
            metrics = train_metrics(rec["run"])
            for ax, (name, title) in zip(axes, CURVES):
                series = offset_series(metrics) if name == "offset" else metrics.get(name)
                if series is None:
                    continue
                if name in DEBIASED_CURVES and not rec.get("debiased", True):
                    continue  # no de-biasing: xi is the sentinel -1 and every support pixel is kept
                steps, values = series
                if name not in ("xi", "offset"):
                    values = moving_average(values)
                    steps = steps[len(steps) - len(values):]
                label = rec["mode"] if rec["seed"] is None else f"{rec['mode']} seed {rec['seed']}"
                ax.plot(steps, values, label=label, color=colours[rec["mode"]], lw=1.2,
                        ls=["-", "--", ":", "-."][(rec["seed"] or 0) % 4])
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
        seed = "" if rec["seed"] is None else f" seed {rec['seed']}"
        if rec["snapshots"]:
            steps, dice = zip(*rec["snapshots"])
            averaged = " (averaged weights)" if rec["weights"] == "averaged" else ""
            ax.plot(steps, dice, marker="o", ms=3, color=colours[rec["mode"]], ls=styles[rec["fold"] % len(styles)],
                    label=f"fold {rec['fold']} {rec['mode']}{seed}{averaged}")
        if rec["raw_snapshots"]:  # --raw-too: the raw weights of the same checkpoints
            steps, dice = zip(*rec["raw_snapshots"])
            ax.plot(steps, dice, marker="s", ms=3, color=colours[rec["mode"]], alpha=0.5,
                    ls=styles[rec["fold"] % len(styles)], label=f"fold {rec['fold']} {rec['mode']}{seed} (raw weights)")
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
    parser.add_argument("--earlier", type=Path, action="append", default=[], metavar="CSV",
                        help="an earlier report's ablation.csv whose runs join the tables (repeatable)")
    parser.add_argument("--folds", type=int, nargs="+", metavar="F", help="only the runs of these folds")
    parser.add_argument("--seeds", nargs="+", metavar="S", help="only the runs of these seeds (config: the config's)")
    parser.add_argument("--out", type=Path, help="write here instead of into the log folder")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    bad_seeds = [s for s in args.seeds or [] if s != "config" and not s.isdigit()]
    if bad_seeds:
        print(f"error: --seeds {' '.join(bad_seeds)}: expected seed numbers or config", file=sys.stderr)
        return 2
    records = collect(args.root)
    try:
        for path in args.earlier:
            records = merge_earlier(records, read_earlier(path))
    except EarlierTableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = select(records, args.folds, args.seeds)
    if not any(not from_earlier(r) for r in records):
        print(f"error: no evaluated run (<dataset>_setting<s>_fold<f>_<arm>/results/results.json) in {args.root}"
              + (" among the selected folds and seeds" if args.folds or args.seeds else ""), file=sys.stderr)
        return 2
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(records)
    md, csv_path = write_tables(header, rows, out)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(records))
    by_step = out / "dice_by_step.md"
    by_step.write_text(dice_by_step_markdown(records))
    print(md.read_text(), end="")
    print(summary.read_text(), end="")
    written = [md, csv_path, summary, by_step] + ([] if args.no_plots else plot(records, out))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
