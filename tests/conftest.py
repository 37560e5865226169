"""Shared pytest fixtures."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAOS_DIR = REPO_ROOT.parent / "shared" / "data" / "CHAOST2"


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    """The real CHAOS T2-SPIR data next to the repository; skips the test when absent."""
    if not (CHAOS_DIR / "image_1.nii.gz").is_file():
        pytest.skip(f"real data not found at {CHAOS_DIR}")
    return CHAOS_DIR
