"""Benchmark the 3-D Felzenszwalb supervoxel engine on CHAOS T2-SPIR volumes.

Usage::

    python bench/supervoxels.py [--data-dir data/CHAOST2] [--n N] [--no-cli]

For each of the first N volumes (numeric id order) a fresh Python process reads the image and runs
``supervoxelize_volume`` (rescale to [0, 255] + engine + body mask + relabel, exactly what the CLI
computes; reading and writing the NIfTI files are timed separately). Reported per volume:

* ``seconds``: wall time of ``supervoxelize_volume``; ``cpu_seconds``: its process CPU time (less
  sensitive to other load on the machine);
* ``peak_rss_mb``: the process's peak resident memory (ru_maxrss) at the end, i.e. Python, numpy,
  scipy, SimpleITK, the image and the whole computation; ``baseline_rss_mb``: the same measured after
  the imports and the read, before the computation; their difference is what the computation adds;
* ``n_supervoxels`` (body supervoxels, 1..N) and the engine's phase timings.

Then the CLI is timed on all volumes with ``--workers 2`` into a temporary folder. The last line printed
is one JSON object with the medians and the CLI time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "CHAOST2"  # under the config's default data_root

CHILD = r"""
import json, resource, sys, time
import numpy as np
import SimpleITK as sitk
from supervoxels import _felzenszwalb3d
from supervoxels.generate_supervoxels import supervoxelize_volume, rescale_to_255
from supervoxels.felzenszwalb import edge_factors

def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

path = sys.argv[1]
t0 = time.perf_counter()
image = sitk.ReadImage(path)
array = sitk.GetArrayFromImage(image)
read_s = time.perf_counter() - t0
spacing = image.GetSpacing()[::-1]
baseline = maxrss_mb()
w0, c0 = time.perf_counter(), time.process_time()
labels = supervoxelize_volume(array, spacing, int(sys.argv[2]))
seconds, cpu = time.perf_counter() - w0, time.process_time() - c0
peak = maxrss_mb()
# phase timings of the engine alone (a second run, after the measurements above)
vol32 = rescale_to_255(array).astype(np.float32)
_, n_engine, stats = _felzenszwalb3d.segment(vol32, edge_factors(spacing), 1.0, int(sys.argv[2]))
print(json.dumps({
    "shape": list(array.shape), "read_seconds": read_s, "seconds": seconds, "cpu_seconds": cpu,
    "peak_rss_mb": peak, "baseline_rss_mb": baseline, "n_supervoxels": int(labels.max()),
    "n_engine_labels": n_engine,
    "phases": {k: v for k, v in stats.items() if k.startswith("seconds")},
    "n_edges": stats["n_edges"], "edges_pass2": stats["edges_pass2"],
}))
"""


def case_paths(data_dir: Path) -> list[Path]:
    paths = [p for p in data_dir.glob("image_*.nii.gz") if p.name[6:-7].isdigit()]
    return sorted(paths, key=lambda p: int(p.name[6:-7]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=None, help="number of volumes (default: all)")
    parser.add_argument("--n-sv", type=int, default=5000)
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI timing")
    parser.add_argument("--cli-workers", type=int, default=2)
    args = parser.parse_args()

    paths = case_paths(args.data_dir)
    if not paths:
        print(f"no image_<id>.nii.gz in {args.data_dir}", file=sys.stderr)
        return 2
    selected = paths[: args.n] if args.n else paths
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))

    rows = []
    print(f"{'volume':<16}{'shape':>14}{'seconds':>9}{'cpu s':>8}{'peak MB':>9}{'base MB':>9}{'n_sv':>6}"
          f"   phases (bucket/pass1/pass2[sort]/relabel s)")
    for path in selected:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.n_sv)], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{path.name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["volume"] = path.name
        rows.append(row)
        ph = row["phases"]
        print(f"{path.name:<16}{'x'.join(map(str, row['shape'])):>14}{row['seconds']:>9.3f}"
              f"{row['cpu_seconds']:>8.3f}{row['peak_rss_mb']:>9.0f}{row['baseline_rss_mb']:>9.0f}"
              f"{row['n_supervoxels']:>6}   {ph['seconds_bucket']:.2f}/{ph['seconds_pass1']:.2f}/"
              f"{ph['seconds_pass2']:.2f}[{ph['seconds_sort']:.2f}]/{ph['seconds_relabel']:.2f}", flush=True)

    def med(key):
        return statistics.median(r[key] for r in rows)

    summary = {
        "volumes": len(rows),
        "median_seconds": med("seconds"),
        "median_cpu_seconds": med("cpu_seconds"),
        "max_seconds": max(r["seconds"] for r in rows),
        "median_peak_rss_mb": med("peak_rss_mb"),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "median_added_rss_mb": statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in rows),
        "median_n_supervoxels": med("n_supervoxels"),
        "min_n_supervoxels": min(r["n_supervoxels"] for r in rows),
        "max_n_supervoxels": max(r["n_supervoxels"] for r in rows),
        "median_read_seconds": med("read_seconds"),
    }
    print(f"median: {summary['median_seconds']:.3f} s ({summary['median_cpu_seconds']:.3f} s CPU), "
          f"peak RSS {summary['median_peak_rss_mb']:.0f} MB (computation adds "
          f"{summary['median_added_rss_mb']:.0f} MB), {summary['median_n_supervoxels']:g} supervoxels")

    if not args.no_cli:
        with tempfile.TemporaryDirectory(prefix="bench_sv_") as tmp:
            cmd = [sys.executable, "-m", "supervoxels.generate_supervoxels", "--data-dir", str(args.data_dir),
                   "--out-dir", tmp, "--n-sv", str(args.n_sv), "--workers", str(args.cli_workers),
                   "--no-progress"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
            cli_seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"CLI failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"CLI, {len(paths)} volumes, --workers {args.cli_workers}: {cli_seconds:.1f} s wall "
              f"({proc.stdout.strip()})")
        summary.update({"cli_volumes": len(paths), "cli_workers": args.cli_workers, "cli_seconds": cli_seconds})
    summary["cpu_count"] = os.cpu_count()
    summary["load_avg_1min"] = os.getloadavg()[0]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
