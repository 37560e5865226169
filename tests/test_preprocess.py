"""Pre-processing CLI on tiny hand-made raw inputs (DICOM series + PNG masks, NIfTI)."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dataloaders import preprocess
from dataloaders.volume_io import read_nifti

H, W = 40, 48


def _write_dicom_series(folder: Path, vol: np.ndarray, spacing_xy=2.5, spacing_z=15.4, reverse_names=False):
    """Write vol [Z,H,W] int16 as a DICOM series; file stems IMG-0001-000NN (NN = 1.. in name order)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.123456"
    stems = []
    z = vol.shape[0]
    for k in range(z):
        sl = sitk.GetImageFromArray(vol[k].astype(np.int16))
        sl.SetSpacing((spacing_xy, spacing_xy))  # the writer takes the pixel spacing from the image
        num = (z - k) if reverse_names else (k + 1)
        tags = {
            "0008|0060": "MR",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0013": str(num),
            "0020|0032": f"0\\0\\{k * spacing_z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing_xy}\\{spacing_xy}",
            "0018|0050": str(spacing_z),
            "0008|0018": f"{uid}.3.{k}",
        }
        for key, val in tags.items():
            sl.SetMetaData(key, val)
        stem = f"IMG-0001-{num:05d}"
        writer.SetFileName(str(folder / f"{stem}.dcm"))
        writer.Execute(sl)
        stems.append(stem)
    return stems  # stems[k] belongs to the slice at position k (z = k * spacing_z)


def _chaos_case(root: Path, case_id: int, reverse_names: bool):
    """A 4-slice case: slice k has a bright square at rows 4-11 (top) in columns depending on k."""
    z = 4
    vol = np.full((z, H, W), 100, dtype=np.int16)
    masks = np.zeros((z, H, W), dtype=np.uint8)
    for k in range(z):
        vol[k, 4:12, 6 + 8 * k : 14 + 8 * k] = 400
        masks[k, 4:12, 6 + 8 * k : 14 + 8 * k] = [63, 126, 189, 252][k]
    vol[0, 0, 0] = 30000  # one hot voxel: clipped at the 99.5th percentile
    case = root / "Train_Sets" / "MR" / str(case_id) / "T2SPIR"
    stems = _write_dicom_series(case / "DICOM_anon", vol, reverse_names=reverse_names)
    (case / "Ground").mkdir(parents=True)
    for k, stem in enumerate(stems):
        Image.fromarray(masks[k]).save(case / "Ground" / f"{stem}.png")
    return vol


@pytest.mark.parametrize("reverse_names,rule", [(False, "round"), (True, "round"), (False, "public")])
def test_chaos_dicom_and_png(tmp_path, reverse_names, rule):
    raw = tmp_path / "raw"
    vol = _chaos_case(raw, 3, reverse_names)
    out = tmp_path / "out"
    args = ["--dataset", "CHAOST2", "--raw-dir", str(raw), "--out-dir", str(out)]
    assert preprocess.main(args + ([] if rule == "public" else ["--resample-size", rule])) == 0
    img, ref = read_nifti(out / "image_3.nii.gz")
    lab, lref = read_nifti(out / "label_3.nii.gz")
    # Geometry: 1.25 x 1.25 x 7.7 mm, 256 x 256, 4 slices at 15.4 mm -> 8 slices at 7.7 mm; the public
    # rule int(4 * 15.4 / 7.7 + 1) = 9 adds a slice past the data, with no label in it
    assert np.allclose(ref.GetSpacing(), (1.25, 1.25, 7.7))
    n_z = 9 if rule == "public" else 8
    assert img.shape == lab.shape == (n_z, 256, 256)
    if rule == "public":
        assert not lab[-1].any() and lab[-2].any()
    assert np.allclose(ref.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))  # public-release layout
    assert np.allclose(lref.GetOrigin(), ref.GetOrigin())
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
    # Clipping: the hot voxel is gone; padding uses the minimum.
    assert img.max() < 1000
    assert img.min() >= 99.0
    # Alignment: every label sits on the bright square of its slice.
    for c in range(1, 5):
        m = lab == c
        assert m.sum() > 0
        assert img[m].mean() > 240 and img[m].max() > 390, f"class {c} not on its bright square"
    # The explicit flip: DICOM top rows (posterior at the top after LAS reorientation) end in the bottom half.
    rows = np.nonzero(lab)[1]
    assert rows.min() > 128
    # Label c follows the DICOM slice position k = c - 1 (increasing z), whatever the file-name order.
    zs = [np.nonzero(lab == c)[0].mean() for c in range(1, 5)]
    assert zs == sorted(zs)
    # Physical position of the class-1 square equals its position in the raw DICOM volume.
    zz, yy, xx = [int(v) for v in np.argwhere(lab == 1).mean(axis=0).round()]
    p = ref.TransformIndexToPhysicalPoint((xx, yy, zz))
    assert 6 * 2.5 - 2.5 <= p[0] <= 14 * 2.5 and 4 * 2.5 - 2.5 <= p[1] <= 12 * 2.5


def test_chaos_flip_rows_is_explicit(tmp_path):
    raw = tmp_path / "raw"
    _chaos_case(raw, 1, False)
    case = raw / "Train_Sets" / "MR" / "1" / "T2SPIR"
    _, files = preprocess.read_dicom_series(case / "DICOM_anon")
    pngs = sorted((case / "Ground").glob("*.png"))
    plain = preprocess.chaos_label_array(files, pngs)
    flipped = preprocess.chaos_label_array(files, pngs, flip_rows=True)
    assert np.nonzero(plain)[1].max() < 12
    assert np.array_equal(flipped, plain[:, ::-1])


def test_chaos_bad_png_value(tmp_path):
    raw = tmp_path / "raw"
    _chaos_case(raw, 1, False)
    png = sorted((raw / "Train_Sets" / "MR" / "1" / "T2SPIR" / "Ground").glob("*.png"))[0]
    arr = np.zeros((H, W), np.uint8)
    arr[0, 0] = 90
    Image.fromarray(arr).save(png)
    with pytest.raises(ValueError, match="unexpected mask grey value"):
        preprocess.preprocess_dataset("CHAOST2", raw, tmp_path / "out", verbose=False)


def _write_nifti(path: Path, arr: np.ndarray, spacing_xyz):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))


def test_cmr_nifti(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 500, size=(5, 60, 70)).astype(np.float32)
    img[2, 30, 30] = 1e5
    lab = np.zeros((5, 60, 70), np.int16)
    lab[1:4, 10:30, 10:30] = 200
    lab[1:4, 15:25, 15:25] = 500
    lab[1:4, 35:50, 40:60] = 600
    _write_nifti(raw / "p7" / "patient7_C0.nii.gz", img, (1.5, 1.5, 9.0))
    _write_nifti(raw / "p7" / "patient7_C0_manual.nii.gz", lab, (1.5, 1.5, 9.0))
    out = tmp_path / "out"
    assert preprocess.main(["--dataset", "CMR", "--raw-dir", str(raw), "--out-dir", str(out)]) == 0
    im, ref = read_nifti(out / "image_7.nii.gz")
    lb, _ = read_nifti(out / "label_7.nii.gz")
    assert np.allclose(ref.GetSpacing(), (1.25, 1.25, 7.99))
    assert im.shape == lb.shape and im.shape[1:] == (256, 256)
    assert im.shape[0] == round(5 * 9.0 / 7.99)
    assert set(np.unique(lb).tolist()) == {0, 200, 500, 600}
    assert im.max() <= np.percentile(img, 99.5) + 1e-3


def test_cmr_unknown_label(tmp_path):
    raw = tmp_path / "raw"
    _write_nifti(raw / "patient1_C0.nii.gz", np.ones((3, 20, 20), np.float32), (1.25, 1.25, 8.0))
    bad = np.zeros((3, 20, 20), np.int16)
    bad[1, 5, 5] = 300
    _write_nifti(raw / "patient1_C0_manual.nii.gz", bad, (1.25, 1.25, 8.0))
    with pytest.raises(ValueError, match=r"patient1_C0_manual.nii.gz: unknown label value"):
        preprocess.preprocess_dataset("CMR", raw, tmp_path / "out", verbose=False)


def test_sabs_nifti(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(1)
    img = rng.uniform(-1000, 1000, size=(3, 512, 512)).astype(np.int16)
    lab = np.zeros((3, 512, 512), np.uint8)
    lab[:, 200:300, 200:300] = 6
    lab[:, 100:150, 300:350] = 1
    for num in (1, 2):
        _write_nifti(raw / "img" / f"img{num:04d}.nii.gz", img, (0.7, 0.7, 3.0))
        _write_nifti(raw / "label" / f"label{num:04d}.nii.gz", lab, (0.7, 0.7, 3.0))
    out = tmp_path / "out"
    assert preprocess.main(["--dataset", "SABS", "--raw-dir", str(raw), "--out-dir", str(out), "--ids", "1"]) == 0
    assert not (out / "image_0.nii.gz").exists() and (out / "image_1.nii.gz").exists()
    im, ref = read_nifti(out / "image_1.nii.gz")
    lb, _ = read_nifti(out / "label_1.nii.gz")
    # z spacing kept: the public size rule gives int(3 + 1) = 4 slices (and 257 x 257 before the crop)
    assert im.shape == lb.shape == (4, 256, 256)
    assert np.allclose(ref.GetSpacing(), (0.7 * 1.75, 0.7 * 1.75, 3.0))
    assert im.min() >= 0 and im.max() <= 255
    assert set(np.unique(lb).tolist()) == {0, 1, 6}


def test_missing_raw_dir(tmp_path):
    assert preprocess.main(["--dataset", "SABS", "--raw-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("n,spacing,target,public,rounded", [
    (10, 7.7, 7.7, 11, 10),      # same spacing: the public rule adds a voxel
    (30, 6.0, 7.7, 24, 23),      # 23.38 -> int(24.38) = 24, round 23
    (20, 9.0, 7.99, 23, 23),     # 22.53 -> int(23.53) = 23, round 23
    (448, 0.7, 0.7 * 1.75, 257, 256),  # Synapse in-plane after the 32-px crop: 256.0
    (1, 1.0, 100.0, 1, 1),       # never below one voxel
])
def test_resampled_size_by_hand(n, spacing, target, public, rounded):
    assert preprocess.resampled_size(n, spacing, target, "public") == public
    assert preprocess.resampled_size(n, spacing, target, "round") == rounded


def test_resampled_size_rejects_unknown_rule():
    with pytest.raises(ValueError, match="resample size rule must be one of"):
        preprocess.resampled_size(10, 1.0, 1.0, "ceil")


def test_png_grey_values_come_from_the_spec(tmp_path):
    from dataclasses import replace

    from dataloaders.dataset_specifics import get_dataset_spec

    arr = np.zeros((H, W), np.uint8)
    arr[2:5, 2:5] = 90
    Image.fromarray(arr).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"m.png: unexpected mask grey value\(s\) \[90\]; expected 0 or a value in "
                                         r"55-70, 110-135, 175-200, 240-255$"):
        preprocess.read_png_masks([tmp_path / "m.png"])
    spec = replace(get_dataset_spec("CHAOST2"), png_label_values={2: (80, 100)})
    lab = preprocess.read_png_masks([tmp_path / "m.png"], spec)
    assert lab.shape == (1, H, W) and set(np.unique(lab).tolist()) == {0, 2} and lab[0, 3, 3] == 2


def test_sabs_unknown_label(tmp_path):
    raw = tmp_path / "raw"
    lab = np.zeros((2, 80, 80), np.uint8)
    lab[0, 40, 40] = 14
    _write_nifti(raw / "img" / "img0001.nii.gz", np.zeros((2, 80, 80), np.int16), (0.7, 0.7, 3.0))
    _write_nifti(raw / "label" / "label0001.nii.gz", lab, (0.7, 0.7, 3.0))
    with pytest.raises(ValueError, match=r"label0001.nii.gz: unknown label value\(s\) \[14\] for SABS; valid: 0, 1, "
                                         r"2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13$"):
        preprocess.preprocess_dataset("SABS", raw, tmp_path / "out", verbose=False)
