"""Benchmark: augmented self-supervised training episodes on CHAOST2 (256 x 256), one process.

Usage::

    python bench/episodes.py --data-dir data/CHAOST2 [--n 200] [--fold 0] [--sv-dir DIR]

Loads the training volumes of ``--fold`` (15 of the 20 CHAOST2 volumes) with their supervoxels, builds the
episode index, then samples ``--n`` augmented 1-shot episodes in this process. Supervoxels are read from
``--sv-dir``, else from ``DATA_DIR/supervoxels_<n_sv>``, else generated with the supervoxel engine (in a
child process) into a temporary folder that is deleted afterwards (the data folder is never written).

Prints one JSON line, last, with ``episodes_per_s``, ``ms_per_episode``, ``peak_rss_mb`` (this process's
peak resident memory, everything included: torch, the volumes, the index), ``load_s``, ``index_s``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--n", type=int, default=200, help="episodes to sample (default 200)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--sv-dir", type=Path, default=None, help="folder with superpix-MIDDLE_<id>.nii.gz")
    p.add_argument("--load-workers", type=int, default=2, help="processes reading the volumes (default 2)")
    p.add_argument("--seed", type=int, default=2025)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from dataloaders.dataset_specifics import get_dataset_spec
    from dataloaders.episodes import SupervoxelEpisodes, build_training_cases
    from dataloaders.volume_io import supervoxel_dir

    spec = get_dataset_spec("CHAOST2")
    tmp = None
    sv_dir = args.sv_dir
    gen_s = 0.0
    if sv_dir is None and not supervoxel_dir(args.data_dir, spec.n_sv).is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="bench_sv_")
        sv_dir = Path(tmp.name)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "supervoxels.generate_supervoxels", "--data-dir", str(args.data_dir),
               "--n-sv", str(spec.n_sv), "--out-dir", str(sv_dir), "--no-progress"]
        subprocess.run(cmd, check=True, cwd=REPO)
        gen_s = time.perf_counter() - t
    try:
        t0 = time.perf_counter()
        cases = build_training_cases(args.data_dir, spec, args.fold, spec.n_sv, use_gt=False, load_label=False,
                                     num_workers=args.load_workers, sv_dir=sv_dir)
        t1 = time.perf_counter()
        ds = SupervoxelEpisodes(cases, n_episodes=args.n, augment=True, seed=args.seed)
        t2 = time.perf_counter()
        ds[0]  # warm-up (first cv2 / torch calls)
        t3 = time.perf_counter()
        for i in range(args.n):
            item = ds[i]
        t4 = time.perf_counter()
    finally:
        if tmp is not None:
            tmp.cleanup()
    eps = args.n / (t4 - t3)
    result = {
        "bench": "episodes",
        "dataset": "CHAOST2",
        "fold": args.fold,
        "n_volumes": len(cases),
        "slice_hw": list(item["query_images"].shape[-2:]),
        "n": args.n,
        "episodes_per_s": round(eps, 1),
        "ms_per_episode": round(1000.0 / eps, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "load_s": round(t1 - t0, 2),
        "index_s": round(t2 - t1, 3),
        "supervoxel_generation_s": round(gen_s, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
