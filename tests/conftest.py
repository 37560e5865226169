"""Shared pytest fixtures.

The tests marked ``real_data`` read the real CHAOS T2-SPIR volumes (``image_<id>.nii.gz``, pre-processed)
from the folder named by the environment variable ``DMAP_CHAOST2_DIR`` (relative paths are relative to the
repository root), by default ``REAL_DATA_DEFAULT``; they are skipped when it holds no volume.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_VARIABLE = "DMAP_CHAOST2_DIR"
REAL_DATA_DEFAULT = "../shared/data/CHAOST2"
CHAOS_DIR = (REPO_ROOT / os.environ.get(REAL_DATA_VARIABLE, REAL_DATA_DEFAULT)).resolve()


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    """The real CHAOS T2-SPIR data next to the repository; skips the test when absent."""
    if not (CHAOS_DIR / "image_1.nii.gz").is_file():
        pytest.skip(f"real data not found at {CHAOS_DIR} (set {REAL_DATA_VARIABLE})")
    return CHAOS_DIR


SYNTH_TEST_SIZE = 64


def smoke_updates(synth_root: Path, log_dir: Path, **updates) -> dict:
    """Config updates that point the ``smoke`` named config at the test data and a log folder."""
    from dataloaders.dataset_specifics import get_dataset_spec

    # a quarter of the voxels per slice at 64 px instead of 128: a quarter of the minimum size
    n_sv = get_dataset_spec("SYNTH").n_sv // 4
    return {"data_root": str(synth_root), "path": {"log_dir": str(log_dir)}, "n_sv": n_sv, **updates}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic data set (6 phantoms of 64 x 64 px) with supervoxels, as ``<root>/SYNTH``."""
    from dataloaders.synthetic import generate_synthetic_dataset
    from supervoxels.generate_supervoxels import main as generate_supervoxels

    root = tmp_path_factory.mktemp("data")
    data_dir = root / "SYNTH"
    generate_synthetic_dataset(data_dir, n_volumes=6, size=SYNTH_TEST_SIZE, seed=0)
    n_sv = smoke_updates(root, root)["n_sv"]
    status = generate_supervoxels(["--data-dir", str(data_dir), "--n-sv", str(n_sv), "--workers", "1"])
    assert status in (0, None)
    return root
