"""Synthetic phantom generator: determinism, layout, labels, plausible organs."""
import numpy as np
import pytest

from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.synthetic import generate_phantom, generate_synthetic_dataset, main
from dataloaders.volume_io import list_case_ids, load_case, read_nifti


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(out, n_volumes=3, size=96, seed=5)
    return out


def test_layout_and_geometry(synth_dir):
    assert list_case_ids(synth_dir) == [1, 2, 3]
    spec = get_dataset_spec("SYNTH")
    for cid in (1, 2, 3):
        img, ref = read_nifti(synth_dir / f"image_{cid}.nii.gz")
        lab, lref = read_nifti(synth_dir / f"label_{cid}.nii.gz")
        assert img.shape == lab.shape and img.shape[1:] == (96, 96) and 20 <= img.shape[0] <= 32
        sx, sy, sz = ref.GetSpacing()
        assert sx == pytest.approx(320 / 96) and sy == sx and 5.0 <= sz <= 8.0
        assert lref.GetSpacing() == ref.GetSpacing() and lref.GetOrigin() == ref.GetOrigin()
        assert np.all(np.isfinite(img)) and img.min() >= 0
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
        load_case(synth_dir, cid, spec)  # loads without errors


def test_organs_plausible():
    image, label, spacing = generate_phantom(np.random.default_rng([0, 0, 0]), 128)
    z = label.shape[0]
    vox_ml = np.prod(spacing) / 1000.0
    slices = {c: int((label == c).any(axis=(1, 2)).sum()) for c in range(1, 5)}
    vol_ml = {c: float((label == c).sum() * vox_ml) for c in range(1, 5)}
    # liver in many slices, kidneys and spleen in fewer, all enough for 3 EP1 chunks
    assert slices[1] >= 0.45 * z and min(slices.values()) >= 5
    assert slices[1] > max(slices[2], slices[3], slices[4])
    assert 600 < vol_ml[1] < 3000  # liver, ml
    for c in (2, 3, 4):
        assert 40 < vol_ml[c] < 600
    # organs separable by appearance: distinct mean intensities
    means = sorted(float(image[label == c].mean()) for c in range(1, 5))
    assert min(np.diff(means)) > 10
    # kidneys posterior (top rows) of the liver's centre; liver on the image left, spleen on the right
    cy = {c: np.nonzero(label == c)[1].mean() for c in range(1, 5)}
    cx = {c: np.nonzero(label == c)[2].mean() for c in range(1, 5)}
    assert cy[2] < cy[1] and cx[1] < 64 < cx[4] and cx[2] < 64 < cx[3]


def test_determinism(tmp_path, synth_dir):
    generate_synthetic_dataset(tmp_path, n_volumes=3, size=96, seed=5)
    for cid in (1, 2, 3):
        for kind in ("image", "label"):
            a, ra = read_nifti(synth_dir / f"{kind}_{cid}.nii.gz")
            b, rb = read_nifti(tmp_path / f"{kind}_{cid}.nii.gz")
            assert np.array_equal(a, b) and ra.GetSpacing() == rb.GetSpacing()
    other, _, _ = generate_phantom(np.random.default_rng([6, 0, 0]), 96)
    first, _ = read_nifti(synth_dir / "image_1.nii.gz")
    assert other.shape != first.shape or not np.array_equal(other, first)


def test_cli(tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path), "--n-volumes", "1", "--size", "64", "--seed", "1"]) == 0
    assert (tmp_path / "image_1.nii.gz").is_file() and (tmp_path / "label_1.nii.gz").is_file()
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), "--size", "8"])


def test_supervoxel_count(synth_dir):
    """The supervoxel engine finds 10-60 supervoxels per phantom at the SYNTH default n_sv."""
    pytest.importorskip("supervoxels._felzenszwalb3d")
    from supervoxels.generate_supervoxels import supervoxelize_volume

    generate_synthetic_dataset(synth_dir / "s128", n_volumes=1, size=128, seed=0)
    img, ref = read_nifti(synth_dir / "s128" / "image_1.nii.gz")
    sv = supervoxelize_volume(img, tuple(reversed(ref.GetSpacing())), get_dataset_spec("SYNTH").n_sv)
    n = len(np.unique(sv[sv > 0]))
    assert 10 <= n <= 60
