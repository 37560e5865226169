"""The all-background collapse with small structures: tau and the predicted foreground fraction early in training.

    python bench/collapse.py --data-dir data/CHAOST2 --sv-dir runs/chaos_sv/supervoxels_300 --steps 200
    python bench/collapse.py ... --variant pixels "" --variant classes "loss.normalize=classes loss.class_weights=[1.0,1.0]"
    python bench/collapse.py --from-json docs/evidence/collapse/collapse_sv300.json --plot curves.png

Small supervoxels (``--n-sv 300`` on CHAOS T2: about 0.4 % of a 160 x 160 query is foreground) stand in for
small structures in a wide field of view (cardiac MR). Each variant trains the ``cpu`` recipe for ``--steps``
steps from the same seed (``training.py`` in a subprocess, one thread each unless ``--threads``), then the
logged query-threshold offset tau and the predicted / labelled foreground fractions are printed side by side.
A variant whose predicted foreground fraction is 0 at every one of its last five logs is reported as
``collapsed``: it predicts background everywhere.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = [("pixels", ""), ("classes", "loss.normalize=classes loss.class_weights=[1.0,1.0]")]


def run_variant(name: str, overrides: str, args: argparse.Namespace, log_dir: Path) -> dict[str, list]:
    """Train one variant and return its logged scalars ``{name: (steps, values)}``."""
    cmd = [sys.executable, str(REPO_ROOT / "training.py"), "with", "cpu", f"data_dir={args.data_dir}",
           f"supervoxel_dir={args.sv_dir}", f"n_steps={args.steps}", "log_every=10", f"num_threads={args.threads}",
           f"path.log_dir={log_dir}", f"tag={name}", "tensorboard=False", f"seed={args.seed}", *overrides.split()]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name}: training failed: {done.stderr.strip().splitlines()[-1:]}")
    metrics = sorted(log_dir.glob(f"*_{name}/train/[0-9]*/metrics.json"))[-1]
    logged = json.loads(metrics.read_text())
    print(f"{name}: {args.steps} steps in {time.monotonic() - start:.0f} s", flush=True)
    return {key: (series["steps"], series["values"]) for key, series in logged.items()}


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """tau and the predicted / labelled foreground fraction against step, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, c in curves.items():
        axes[0].plot(*c["tau"], label=name, lw=1.2)
        axes[1].plot(*c["pred_fg_fraction"], label=f"{name}: predicted", lw=1.2)
    first = next(iter(curves.values()))
    axes[1].plot(*first["true_fg_fraction"], color="grey", lw=0.8, ls=":", label="labelled")
    axes[0].set_title("query threshold offset tau", fontsize=10)
    axes[1].set_title("foreground fraction of the query", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--sv-dir", help="supervoxels of a small size (e.g. --n-sv 300)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                        help="a name and its Sacred overrides (default: pixels vs classes normalisation)")
    parser.add_argument("--out", type=Path, help="also write the curves as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw the curves into this PNG")
    parser.add_argument("--from-json", type=Path, help="read the curves of an earlier --out instead of training")
    args = parser.parse_args(argv)
    if args.from_json:
        curves = {n: {k: (v["steps"], v["values"]) for k, v in c.items()}
                  for n, c in json.loads(args.from_json.read_text()).items()}
    else:
        if not (args.data_dir and args.sv_dir):
            parser.error("--data-dir and --sv-dir are needed to train (or give --from-json)")
        variants = args.variant or DEFAULT_VARIANTS
        with tempfile.TemporaryDirectory() as tmp:
            curves = {name: run_variant(name, overrides, args, Path(tmp)) for name, overrides in variants}
    names = list(curves)
    print("step | " + " | ".join(f"{n}: tau, pred fg, true fg" for n in names))
    steps = curves[names[0]]["tau"][0]
    for i, step in enumerate(steps):
        cells = []
        for n in names:
            c = curves[n]
            cells.append(f"{c['tau'][1][i]:7.2f}, {c['pred_fg_fraction'][1][i]:.4f}, {c['true_fg_fraction'][1][i]:.4f}")
        print(f"{step:5d} | " + " | ".join(cells))
    for n in names:
        tail = curves[n]["pred_fg_fraction"][1][-5:]
        print(f"{n}: {'collapsed (predicts no foreground)' if max(tail) == 0 else 'predicts foreground'}; "
              f"final tau {curves[n]['tau'][1][-1]:.2f}")
    if args.plot:
        plot_curves(curves, args.plot)
    if args.out:
        args.out.write_text(json.dumps({n: {k: {"steps": v[0], "values": v[1]} for k, v in c.items()
                                            if k in ("tau", "pred_fg_fraction", "true_fg_fraction", "loss")}
                                        for n, c in curves.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
