"""Tests of the supervoxel generation CLI and supervoxelize_volume (supervoxels.generate_supervoxels)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from supervoxels.felzenszwalb import felzenszwalb_3d
from supervoxels.generate_supervoxels import body_mask, main, rescale_to_255, supervoxelize_volume

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACING_XYZ = (1.5, 1.5, 4.0)  # SimpleITK order (x, y, z)
N_SV = 40


def phantom(seed: int, shape=(6, 40, 44)) -> np.ndarray:
    """Body ellipse (with a dark hole and a few organs) on a zero background, plus a detached blob."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cy, cx = shape[1] / 2, shape[2] / 2
    body = ((y - cy) / (shape[1] * 0.4)) ** 2 + ((x - cx) / (shape[2] * 0.4)) ** 2 < 1
    img = np.where(body, 300.0, 0.0)
    img[((y - cy) / 4) ** 2 + ((x - cx + 6) / 4) ** 2 < 1] = 600.0
    img[((y - cy - 5) / 3) ** 2 + ((x - cx - 7) / 5) ** 2 < 1] = 900.0
    img[(np.abs(y - cy + 6) < 2) & (np.abs(x - cx) < 2)] = 0.0  # hole inside the body
    img[:, 1:3, 1:3] = 800.0  # small detached bright blob outside the body (not the largest component)
    img += rng.normal(0, 5, size=shape) * body
    return img.astype(np.float32)


def write_image(path: Path, array: np.ndarray, spacing=SPACING_XYZ, origin=(-10.0, 5.0, 2.5)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture()
def dataset(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for case_id in (1, 2, 10):
        write_image(data / f"image_{case_id}.nii.gz", phantom(case_id))
        write_image(data / f"label_{case_id}.nii.gz", np.zeros((6, 40, 44), np.uint8))
    return data


def run_cli(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def read(path: Path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


# ----------------------------------------------------------------------------------------------------
# Library functions
# ----------------------------------------------------------------------------------------------------


def test_rescale_to_255():
    out = rescale_to_255(np.array([[[-5.0, 0.0, 15.0]]]))
    np.testing.assert_allclose(out, [[[0.0, 255 * 5 / 20, 255.0]]])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(rescale_to_255(np.full((2, 2, 2), 7.0)), 0.0)


def test_body_mask_largest_component_and_holes():
    img = np.zeros((2, 20, 20))
    img[0, 3:15, 3:15] = 200
    img[0, 7:9, 7:9] = 0  # hole: filled
    img[0, 17:19, 17:19] = 200  # smaller component: dropped
    mask = body_mask(img, 10)
    expected = np.zeros((20, 20), bool)
    expected[3:15, 3:15] = True
    np.testing.assert_array_equal(mask[0], expected)
    assert not mask[1].any()  # empty slice
    # 8-connectivity: a diagonal touch joins two squares into one component
    img2 = np.zeros((1, 10, 10))
    img2[0, 0:3, 0:3] = 100
    img2[0, 3:6, 3:6] = 100
    assert body_mask(img2, 10).sum() == 18


def test_supervoxelize_volume_matches_engine_and_mask():
    img = phantom(3)
    spacing = SPACING_XYZ[::-1]
    out = supervoxelize_volume(img, spacing, N_SV)
    assert out.dtype == np.int32 and out.shape == img.shape
    scaled = rescale_to_255(img)
    mask = body_mask(scaled, 10)
    engine = felzenszwalb_3d(scaled, spacing, min_size=N_SV)
    assert np.all(out[~mask] == 0) and np.all(out[mask] > 0)
    n = out.max()
    assert set(np.unique(out[mask])) == set(range(1, n + 1))
    # same partition of the body as the engine's labels
    pairs = np.unique(np.stack([out[mask], engine[mask]]), axis=1)
    assert pairs.shape[1] == n == len(np.unique(engine[mask]))
    assert n >= 2
    # the detached blob outside the body is background
    assert np.all(out[:, 1:3, 1:3] == 0)


def test_supervoxelize_volume_errors():
    with pytest.raises(ValueError, match="3-D"):
        supervoxelize_volume(np.zeros((4, 4)), (1, 1, 1), 10)
    with pytest.raises(ValueError, match="NaN"):
        supervoxelize_volume(np.full((2, 4, 4), np.nan), (1, 1, 1), 10)
    with pytest.raises(ValueError, match="spacing"):
        supervoxelize_volume(np.ones((2, 4, 4)), (1, 0, 1), 10)
    with pytest.raises(ValueError, match="min_size"):
        supervoxelize_volume(np.ones((2, 4, 4)), (1, 1, 1), 0)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def test_cli_writes_files_with_geometry(dataset, capsys):
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--workers", 1) == 0
    out_dir = dataset / f"supervoxels_{N_SV}"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "superpix-MIDDLE_1.nii.gz",
        "superpix-MIDDLE_10.nii.gz",
        "superpix-MIDDLE_2.nii.gz",
    ]
    for case_id in (1, 2, 10):
        ref, ref_arr = read(dataset / f"image_{case_id}.nii.gz")
        sv, arr = read(out_dir / f"superpix-MIDDLE_{case_id}.nii.gz")
        assert sv.GetPixelID() == sitk.sitkInt32 and arr.dtype == np.int32
        assert sv.GetSize() == ref.GetSize()
        np.testing.assert_allclose(sv.GetSpacing(), ref.GetSpacing())
        np.testing.assert_allclose(sv.GetOrigin(), ref.GetOrigin())
        np.testing.assert_allclose(sv.GetDirection(), ref.GetDirection())
        expected = supervoxelize_volume(ref_arr, ref.GetSpacing()[::-1], N_SV)
        np.testing.assert_array_equal(arr, expected)
        mask = body_mask(rescale_to_255(ref_arr), 10)
        assert np.all(arr[~mask] == 0) and np.all(arr[mask] >= 1)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3 volumes written" in summary and "min/median/max" in summary


def test_cli_skip_and_overwrite(dataset, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", out_dir, "--workers", 1) == 0
    target = out_dir / "superpix-MIDDLE_2.nii.gz"
    good = read(target)[1]
    sentinel = sitk.GetImageFromArray(np.full((2, 2, 2), 7, np.int32))
    sitk.WriteImage(sentinel, str(target))
    capsys.readouterr()
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", out_dir, "--workers", 1) == 0
    assert "0 volumes written, 3 skipped" in capsys.readouterr().out
    assert read(target)[1].shape == (2, 2, 2)  # left alone
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", out_dir, "--overwrite", "--workers", 1) == 0
    np.testing.assert_array_equal(read(target)[1], good)
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_parallel_workers_same_output(dataset, tmp_path):
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", tmp_path / "a", "--workers", 1) == 0
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", tmp_path / "b", "--workers", 2) == 0
    for case_id in (1, 2, 10):
        name = f"superpix-MIDDLE_{case_id}.nii.gz"
        np.testing.assert_array_equal(read(tmp_path / "a" / name)[1], read(tmp_path / "b" / name)[1])


def test_cli_missing_and_empty_dir(tmp_path, capsys):
    assert run_cli("--data-dir", tmp_path / "nope") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "label_1.nii.gz").write_bytes(b"")
    assert run_cli("--data-dir", tmp_path / "empty") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image_<id>.nii.gz" in err and "empty" in err


def test_cli_bad_arguments(dataset, capsys):
    assert run_cli("--data-dir", dataset, "--n-sv", 0) == 2
    assert "--n-sv" in capsys.readouterr().err
    assert run_cli("--data-dir", dataset, "--workers", 0) == 2
    assert "--workers" in capsys.readouterr().err


def test_cli_unreadable_file_and_no_foreground(dataset, tmp_path, capsys):
    (dataset / "image_5.nii.gz").write_bytes(b"this is not a nifti file")
    write_image(dataset / "image_7.nii.gz", np.zeros((4, 10, 10), np.float32))
    out_dir = tmp_path / "out"
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", out_dir, "--workers", 1) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(errors) == 1 and "image_5.nii.gz" in errors[0] and "cannot read" in errors[0]
    assert len(warnings) == 1 and "image_7.nii.gz" in warnings[0] and "no foreground" in warnings[0]
    assert "4 volumes written" in captured.out and "1 failed" in captured.out
    assert not (out_dir / "superpix-MIDDLE_5.nii.gz").exists()
    empty = read(out_dir / "superpix-MIDDLE_7.nii.gz")[1]
    assert empty.dtype == np.int32 and not empty.any()
    for case_id in (1, 2, 10):
        assert (out_dir / f"superpix-MIDDLE_{case_id}.nii.gz").is_file()


@pytest.mark.parametrize("how", ["script", "module"])
def test_cli_entry_points(dataset, tmp_path, how):
    """Works as `python supervoxels/generate_supervoxels.py` and as `python -m ...` from the repo root."""
    out_dir = tmp_path / f"out_{how}"
    if how == "script":
        cmd = [sys.executable, "supervoxels/generate_supervoxels.py"]
    else:
        cmd = [sys.executable, "-m", "supervoxels.generate_supervoxels"]
    cmd += ["--data-dir", str(dataset), "--n-sv", str(N_SV), "--out-dir", str(out_dir), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 volumes written" in proc.stdout
    assert len(list(out_dir.glob("superpix-MIDDLE_*.nii.gz"))) == 3


# ----------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_chaos_volume_supervoxel_count(chaos_dir):
    image = sitk.ReadImage(str(chaos_dir / "image_1.nii.gz"))
    labels = supervoxelize_volume(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1], 5000)
    n = int(labels.max())
    assert 15 <= n <= 45, n
    assert set(np.unique(labels)) == set(range(n + 1))


def test_cli_refuses_a_truncated_image_and_removes_stale_temporaries(tmp_path, capsys):
    dataset = tmp_path / "data"
    dataset.mkdir()
    write_image(dataset / "image_1.nii.gz", phantom(0).astype(np.int16))
    data = (dataset / "image_1.nii.gz").read_bytes()
    (dataset / "image_1.nii.gz").write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = out_dir / ".superpix-MIDDLE_1.tmp999999999.nii.gz"  # left by a run killed mid-write
    stale.write_bytes(b"partial")
    assert run_cli("--data-dir", dataset, "--n-sv", N_SV, "--out-dir", out_dir, "--workers", 1) == 1
    err = capsys.readouterr().err
    assert "image_1.nii.gz" in err and "truncated" in err and "removed 1 half-written" in err
    assert not stale.exists() and not list(out_dir.glob("superpix-MIDDLE_*"))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_cli_workers_end_with_their_parent():
    import signal
    import time

    # a parent that starts a worker with the CLI's initializer, then is killed with SIGKILL
    code = ("import os, time\nfrom concurrent.futures import ProcessPoolExecutor\n"
            "from supervoxels.generate_supervoxels import _die_with_parent\n"
            "pool = ProcessPoolExecutor(1, initializer=_die_with_parent, initargs=(os.getpid(),))\n"
            "print(pool.submit(os.getpid).result(), flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
    worker = int(parent.stdout.readline())
    assert _running(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its killed parent")
