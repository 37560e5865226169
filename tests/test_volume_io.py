"""Volume loading: layout, z-score, and one clear error per kind of bad input."""
import numpy as np
import pytest
import SimpleITK as sitk

from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.volume_io import (compact_labels, count_nonfinite_nifti, list_case_ids, list_images, load_case,
                                   load_cases, read_nifti, supervoxel_file, supervoxel_path, write_nifti_like)

SPEC = get_dataset_spec("CHAOST2")


def _write(path, arr, spacing=(1.25, 1.25, 7.7)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for cid in (10, 2):
        img = rng.uniform(0, 100, (4, 16, 20)).astype(np.float64)
        lab = np.zeros((4, 16, 20), np.uint8)
        lab[1:3, 4:8, 4:8] = 1
        lab[2, 10:12, 10:14] = 4
        _write(tmp_path / f"image_{cid}.nii.gz", img)
        _write(tmp_path / f"label_{cid}.nii.gz", lab)
        _write(tmp_path / "supervoxels_5000" / f"superpix-MIDDLE_{cid}.nii.gz", (lab + 1).astype(np.int32))
    return tmp_path


def test_list_and_load(data_dir):
    assert list_case_ids(data_dir) == [2, 10]
    case = load_case(data_dir, 10, SPEC, n_sv=5000)
    assert case.image.dtype == np.float32 and case.image.shape == (4, 16, 20)
    assert abs(float(case.image.mean())) < 1e-5 and abs(float(case.image.std()) - 1) < 1e-4
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1, 4}
    assert case.supervoxels.dtype == np.int32
    assert case.spacing == pytest.approx((7.7, 1.25, 1.25))
    cases = load_cases(data_dir, [2, 10], SPEC, n_sv=None, load_label=False)
    assert [c.case_id for c in cases] == [2, 10] and cases[0].label is None and cases[0].supervoxels is None


def test_listing_keeps_ids_as_named_and_numeric_ids_first(tmp_path):
    for name in ("image_10.nii.gz", "image_007.nii.gz", "image_b.nii.gz", "image_2.nii.gz", "label_3.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "image_5.nii.gz").mkdir()  # not a file
    assert [cid for cid, _ in list_images(tmp_path)] == ["2", "007", "10", "b"]
    assert list_images(tmp_path)[1][1] == tmp_path / "image_007.nii.gz"
    assert list_case_ids(tmp_path) == [2, 7, 10]
    # the CLI's string ids name files as they stand; the loader's int ids name them in decimal
    assert supervoxel_file(tmp_path, "007").name == "superpix-MIDDLE_007.nii.gz"
    assert supervoxel_path(tmp_path, 7, 1000) == tmp_path / "supervoxels_1000" / "superpix-MIDDLE_7.nii.gz"


def test_load_cases_workers(data_dir):
    a = load_cases(data_dir, [2, 10], SPEC, n_sv=5000, num_workers=2)
    b = load_cases(data_dir, [2, 10], SPEC, n_sv=5000)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.supervoxels, y.supervoxels)


def test_cmr_remap(tmp_path):
    lab = np.zeros((2, 8, 8), np.int16)
    lab[0, 1, 1], lab[0, 2, 2], lab[1, 3, 3] = 200, 500, 600
    _write(tmp_path / "image_1.nii.gz", np.arange(128, dtype=np.float32).reshape(2, 8, 8))
    _write(tmp_path / "label_1.nii.gz", lab)
    case = load_case(tmp_path, 1, get_dataset_spec("CMR"))
    assert case.label[0, 1, 1] == 1 and case.label[0, 2, 2] == 2 and case.label[1, 3, 3] == 3
    assert set(np.unique(case.label)) == {0, 1, 2, 3}


def test_missing_dir_and_files(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        list_case_ids(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image_<id>.nii.gz files"):
        list_case_ids(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"image_3.nii.gz: file not found"):
        load_case(data_dir, 3, SPEC)
    with pytest.raises(FileNotFoundError, match=r"supervoxels_1000/superpix-MIDDLE_2.nii.gz: file not found"):
        load_case(data_dir, 2, SPEC, n_sv=1000)


def test_shape_mismatch(data_dir):
    _write(data_dir / "label_2.nii.gz", np.zeros((3, 16, 20), np.uint8))
    with pytest.raises(ValueError, match=r"label_2.nii.gz: label shape \(3, 16, 20\) \(Z,H,W\) does not match image shape \(4, 16, 20\)"):
        load_case(data_dir, 2, SPEC)
    _write(data_dir / "supervoxels_5000" / "superpix-MIDDLE_10.nii.gz", np.zeros((4, 16, 21), np.int32))
    with pytest.raises(ValueError, match=r"superpix-MIDDLE_10.nii.gz: supervoxel shape"):
        load_case(data_dir, 10, SPEC, n_sv=5000)


def test_nan_and_constant(data_dir, monkeypatch):
    # a reader (not SimpleITK's NIfTI reader, which turns NaN into 0) that returns the NaN itself
    import dataloaders.volume_io as vio

    real = vio.read_nifti

    def nan_reader(path):
        arr, img = real(path)
        if path.name.startswith("image_"):
            arr = arr.astype(np.float32)
            arr[1, 2, 3] = np.nan
        return arr, img

    monkeypatch.setattr(vio, "read_nifti", nan_reader)
    with pytest.raises(ValueError, match=r"image_2.nii.gz: image contains 1 NaN or infinite value"):
        load_case(data_dir, 2, SPEC)
    monkeypatch.setattr(vio, "read_nifti", real)
    _write(data_dir / "image_2.nii.gz", np.ones((4, 16, 20), np.float32))
    with pytest.raises(ValueError, match=r"image_2.nii.gz: image is constant"):
        load_case(data_dir, 2, SPEC)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_stored_in_a_nifti_file_is_found(data_dir, dtype):
    # SimpleITK reads the NaN below as 0; the loader scans the stored values and still reports it
    image = np.random.default_rng(0).normal(size=(4, 16, 20)).astype(dtype)
    image[2, 5, 7] = np.nan
    image[3, 0, 0] = np.inf
    _write(data_dir / "image_2.nii.gz", image)
    assert count_nonfinite_nifti(data_dir / "image_2.nii.gz") == 2
    with pytest.raises(ValueError, match=r"image_2.nii.gz: 2 NaN or infinite value\(s\) stored"):
        load_case(data_dir, 2, SPEC)


def test_unknown_label(data_dir):
    lab = np.zeros((4, 16, 20), np.uint8)
    lab[0, 0, 0] = 7
    _write(data_dir / "label_10.nii.gz", lab)
    with pytest.raises(ValueError, match=r"label_10.nii.gz: unknown label value\(s\) \[7\] for CHAOST2; valid: 0, 1, 2, 3, 4"):
        load_case(data_dir, 10, SPEC)


def test_write_nifti_like_roundtrip(tmp_path, data_dir):
    arr, ref = read_nifti(data_dir / "image_2.nii.gz")
    out = write_nifti_like(arr.astype(np.float32) * 2, ref, tmp_path / "sub" / "x.nii.gz")
    back, img = read_nifti(out)
    assert np.allclose(back, arr * 2) and img.GetSpacing() == ref.GetSpacing()
    assert [p.name for p in out.parent.iterdir()] == ["x.nii.gz"]
    with pytest.raises(ValueError, match="does not match reference shape"):
        write_nifti_like(arr[:2], ref, tmp_path / "y.nii.gz")


def test_compact_and_sv_dir(data_dir, tmp_path):
    case = load_case(data_dir, 2, SPEC, n_sv=5000, compact=True)
    assert case.supervoxels.dtype == np.uint8
    other = tmp_path / "elsewhere"
    arr, ref = read_nifti(data_dir / "supervoxels_5000" / "superpix-MIDDLE_2.nii.gz")
    write_nifti_like(arr, ref, other / "superpix-MIDDLE_2.nii.gz")
    case2 = load_case(data_dir, 2, SPEC, n_sv=5000, sv_dir=other)
    assert np.array_equal(case2.supervoxels, case.supervoxels)


def test_compact_labels_picks_the_smallest_unsigned_dtype():
    for vmax, dtype in ((255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32)):
        out = compact_labels(np.array([[0, vmax]], np.int32))
        assert out.dtype == dtype and out.tolist() == [[0, vmax]]
    small = np.zeros((2, 3), np.uint8)
    assert compact_labels(small) is small  # already compact: no copy
    assert compact_labels(np.zeros((0, 4), np.int64)).dtype == np.uint8


@pytest.mark.real_data
def test_real_chaos_case(chaos_dir):
    case = load_case(chaos_dir, 1, SPEC, load_label=True)
    assert case.image.shape[1:] == (256, 256) and case.label.shape == case.image.shape
    assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3, 4}
    assert case.spacing == pytest.approx((7.7, 1.25, 1.25), abs=1e-3)


def _cut(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("kind", ["image", "label", "supervoxel"])
def test_truncated_gzip_files_are_refused(data_dir, kind):
    # SimpleITK reads a .nii.gz cut in half without error (the lost slices come back as 0)
    path = {"image": data_dir / "image_2.nii.gz", "label": data_dir / "label_2.nii.gz",
            "supervoxel": data_dir / "supervoxels_5000" / "superpix-MIDDLE_2.nii.gz"}[kind]
    _cut(path)
    with pytest.raises(ValueError, match=rf"{path.name}: .*truncated") as info:
        load_case(data_dir, 2, SPEC, n_sv=5000)
    assert "\n" not in str(info.value)


def test_corrupt_gzip_and_short_data_are_refused(data_dir, tmp_path):
    import gzip as gz

    path = data_dir / "label_2.nii.gz"
    raw = gz.decompress(path.read_bytes())
    # a complete gzip stream whose NIfTI data stops 10 bytes short of what the header announces
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gz.compress(raw[:-10]))
    with pytest.raises(ValueError, match=r"short.nii.gz: truncated file: \d+ of the \d+ data bytes"):
        read_nifti(short)
    # one flipped byte in the compressed data: gzip's CRC (or the inflater) fails
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"label_2.nii.gz: cannot read, corrupt or truncated file"):
        read_nifti(path)


def test_nan_in_a_float_label_file_is_refused(data_dir):
    # ITK's reader would turn the NaN into 0 = background
    lab = np.zeros((4, 16, 20), np.float32)
    lab[1, 2, 3] = np.nan
    _write(data_dir / "label_2.nii.gz", lab)
    with pytest.raises(ValueError, match=r"label_2.nii.gz: 1 NaN or infinite value\(s\) stored"):
        load_case(data_dir, 2, SPEC)
