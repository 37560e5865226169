"""Evaluate a run's final weights and each of its step snapshots under EP1 (for Dice against training step).

    python script/evaluate_snapshots.py -- cpu dataset=CHAOST2 eval_fold=0 ...
    python script/evaluate_snapshots.py runs/ablation/CHAOST2_setting1_fold0_learned -- dataset=CHAOST2 ...

The words after ``--`` are what ``test.py with ...`` takes: named configs and ``key=value`` overrides
(dotted keys for sub-dicts, Python literals). The run folder is the one given, else the folder of the
config's recipe (``config.run_dir``, as training names it). Each checkpoint is evaluated as ``test.py``
does, with the model it was trained as: the final weights with results, predictions and overlays in
``<run>/results``; each ``snapshots/step_<n>.pth`` into ``<run>/snapshot_results/step_<n>/results.json`` (no
pictures), skipped when that file exists. Checkpoints that hold averaged weights are scored with them
(``eval_weights=auto``); ``--raw-too`` also scores their raw weights, into ``<run>/results_raw`` and
``<run>/snapshot_results_raw/step_<n>``. The final weights are evaluated again only when ``final.pth`` is
not the file its results were computed from (a resumed run). ``--last N`` evaluates only the N latest step snapshots (with the
final weights, the last N + 1 checkpoints: ``--last 2`` is what the stability figure, the mean of the last
three checkpoints, needs), which halves the evaluation of a seeded sweep that does not plot Dice against step.

With ``tensorboard=True`` (the default) and TensorBoard installed, the mean Dice of each checkpoint evaluated
by this call is also written into the run's TensorBoard folder ``<run>/tensorboard``, at the checkpoint's
training step, as ``eval/dice`` (``eval_raw/dice`` for ``--raw-too``), beside the training curves.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from config import (NAMED_CONFIGS, ConfigError, build_config, configure_logging, one_line_errors,  # noqa: E402
                    resolve_config)
from evaluation.provenance import sha256_file  # noqa: E402
from util.checkpoints import FINAL_NAME, step_snapshots  # noqa: E402
from util.logger import ScalarLogger  # noqa: E402


def parse_with_arguments(words: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Named configs and nested updates from Sacred-style ``with`` words (``a.b=1`` -> ``{"a": {"b": 1}}``)."""
    named, updates = [], {}
    for word in words:
        if "=" not in word:
            if word not in NAMED_CONFIGS:
                raise ConfigError(f"unknown named config {word!r}; valid: {', '.join(NAMED_CONFIGS)}")
            named.append(word)
            continue
        key, text = word.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = updates
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return named, updates


def log_dice(board: ScalarLogger | None, summary: dict[str, Any], suffix: str = "") -> None:
    """Write the mean Dice of an evaluation at its checkpoint's training step as ``eval<suffix>/dice``."""
    step = ((summary.get("provenance") or {}).get("checkpoint") or {}).get("step")
    if board is not None and step is not None:
        board.log({f"eval{suffix}/dice": summary["mean"]["model"]["dice"]}, int(step))


def load_test_module():
    """``test.py`` by path (the name ``test`` is also a standard-library package)."""
    spec = importlib.util.spec_from_file_location("dmap_test_entry", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="the run folder (holds snapshots/); default: the "
                                                               "folder of the config's recipe")
    parser.add_argument("--raw-too", action="store_true",
                        help="also score the raw weights of checkpoints that hold averaged ones")
    parser.add_argument("--last", type=int, default=None, metavar="N",
                        help="evaluate only the N latest step snapshots (the final weights always)")
    args = parser.parse_args(own)
    if args.last is not None and args.last < 0:
        parser.error(f"--last is {args.last}; expected 0 or more snapshots")
    configure_logging(logging.WARNING)
    with one_line_errors("evaluate_snapshots"):
        named, updates = parse_with_arguments(words)
        cfg = resolve_config(build_config(named, updates), need_supervoxels=False)
        run = Path(args.run_dir) if args.run_dir is not None else Path(cfg["run_dir"])
        snapshots = run / "snapshots"
        final = snapshots / FINAL_NAME
        if not final.is_file():
            raise FileNotFoundError(f"{final} does not exist (train the run first)")
        test = load_test_module()
        board = ScalarLogger(None, run / "tensorboard") if cfg.get("tensorboard") else None
        try:
            summary, out_dir = evaluate_all(test, cfg, run, final, board, args.raw_too, args.last)
        finally:
            if board is not None:
                board.close()
    print(test.format_table(summary))
    print(f"results: {out_dir / 'results.json'}")
    return 0


def evaluate_all(test: Any, cfg: dict[str, Any], run: Path, final: Path, board: ScalarLogger | None,
                 raw_too: bool, last: int | None = None) -> tuple[dict[str, Any], Path]:
    """Each step snapshot not yet evaluated (the ``last`` latest if given), then the final weights (as
    :func:`main` describes)."""
    snapshots = final.parent
    passes = [("", cfg.get("eval_weights", "auto"))] + ([("_raw", "raw")] if raw_too else [])
    steps = step_snapshots(snapshots)
    if last is not None:
        steps = steps[len(steps) - last:] if last > 0 else []
    for suffix, weights in passes:
        for path in steps:
            out_dir = run / f"snapshot_results{suffix}" / path.stem
            if (out_dir / "results.json").is_file():
                continue
            summary, _ = test.run_test(dict(cfg, reload_model_path=str(path), save_predictions=False,
                                            eval_weights=weights), out_dir)
            log_dice(board, summary, suffix)
            print(f"{path.name} ({summary['weights']} weights): mean Dice "
                  f"{summary['mean']['model']['dice']:.4f}", flush=True)
    final_sha256 = sha256_file(final)  # read once for both passes
    if raw_too and earlier_result(run / "results_raw", final_sha256, "raw") is None:
        summary, out_dir = test.run_test(dict(cfg, reload_model_path=str(final), save_predictions=False,
                                              eval_weights="raw"), run / "results_raw")
        log_dice(board, summary, "_raw")
        print(f"final (raw weights): mean Dice {summary['mean']['model']['dice']:.4f}", flush=True)
    summary = earlier_result(run / "results", final_sha256, cfg.get("eval_weights", "auto"))
    if summary is not None:
        return summary, run / "results"
    summary, out_dir = test.run_test(dict(cfg, reload_model_path=str(final)), run / "results")
    log_dice(board, summary)
    return summary, out_dir


def earlier_result(out_dir: Path, checkpoint_sha256: str, weights: str) -> dict[str, Any] | None:
    """The summary in ``out_dir/results.json`` if it scored the file of ``checkpoint_sha256`` with ``weights``
    (``auto``: whichever the checkpoint resolves to), else None: a finished run's final weights are not
    evaluated again when an interrupted sweep is re-run, and a resumed run's new final weights are."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        scored = summary["provenance"]["checkpoint"]
    except (ValueError, KeyError, TypeError):
        return None
    if scored.get("sha256") != checkpoint_sha256 or weights not in ("auto", summary.get("weights")):
        return None
    return summary


if __name__ == "__main__":
    sys.exit(main())
