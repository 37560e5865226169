"""A CT phantom in Hounsfield units through the SABS pre-processing and through predict's model space.

The phantom (3 slices of 320 x 320 at 0.7 x 0.7 x 3 mm) has air, soft tissue (40 HU), fat (-100 HU),
bone (200 HU), a block above the window (500 HU), a liver (label 6) and a 32-px frame at 1000 HU that
the border crop must remove. Expected values: (HU + 125) / 400 * 255 inside [-125, 275] HU.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.preprocess import preprocess_sabs_case
from dataloaders.volume_io import zscore
from inference.model_space import read_scan, to_model_space, to_original_grid

SABS = get_dataset_spec("SABS")
SPACING = (0.7, 0.7, 3.0)
# (rows, cols) of each region in the phantom's array, and its HU value
REGIONS = {"fat": ((80, 120), (100, 140), -100), "bone": ((180, 230), (170, 220), 200),
           "bright": ((200, 230), (80, 110), 500), "liver": ((120, 170), (180, 230), 40)}


def windowed(hu: float) -> float:
    return (min(max(hu, -125.0), 275.0) + 125.0) / 400.0 * 255.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    hu = np.full((3, 320, 320), -1000, np.int16)
    y, x = np.mgrid[0:320, 0:320]
    hu[:, (y - 160) ** 2 + (x - 160) ** 2 < 110 ** 2] = 40
    for (r0, r1), (c0, c1), value in REGIONS.values():
        hu[:, r0:r1, c0:c1] = value
    frame = np.ones((320, 320), bool)
    frame[32:-32, 32:-32] = False
    hu[:, frame] = 1000
    label = np.zeros(hu.shape, np.uint8)
    (r0, r1), (c0, c1), _ = REGIONS["liver"]
    label[:, r0:r1, c0:c1] = 6
    paths = []
    for name, array in (("img0001.nii.gz", hu), ("label0001.nii.gz", label)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-112.0, -112.0, 10.0))
        sitk.WriteImage(image, str(folder / name))
        paths.append(folder / name)
    return paths


def value_at(image, reference, row: float, col: float, z: int = 1) -> float:
    """The value of ``image`` at the physical point of pixel (row, col) of slice ``z`` of ``reference``."""
    point = reference.TransformContinuousIndexToPhysicalPoint((col, row, float(z)))
    index = image.TransformPhysicalPointToIndex(point)
    return float(image.GetPixel(index))


def test_sabs_preprocessing_windows_crops_and_rescales(phantom):
    image_file, label_file = phantom
    source = sitk.ReadImage(str(image_file))
    image, label = preprocess_sabs_case(image_file, label_file)
    assert image.GetSpacing() == pytest.approx((0.7 * 1.75, 0.7 * 1.75, 3.0))
    assert image.GetSize()[:2] == (256, 256) and label.GetSize() == image.GetSize()
    for name, ((r0, r1), (c0, c1), hu) in REGIONS.items():
        assert value_at(image, source, (r0 + r1) / 2, (c0 + c1) / 2) == pytest.approx(windowed(hu), abs=1e-3), name
    assert value_at(image, source, 160, 100) == pytest.approx(windowed(40), abs=1e-3)  # soft tissue
    assert value_at(image, source, 50, 160) == pytest.approx(0.0)  # air inside the crop
    # the 1000 HU frame is gone: its place is padding at the image minimum, and the only 255 left is the
    # 500 HU block (30 x 30 px of 0.7 mm -> about 17 x 17 px of 1.225 mm)
    assert value_at(image, source, 10, 160) == pytest.approx(0.0)
    n_bright = int((sitk.GetArrayViewFromImage(image)[1] >= 255.0 - 1e-3).sum())
    assert 0.6 * 17 ** 2 < n_bright < 1.4 * 17 ** 2
    # the liver stays where it was in the patient
    before = physical_centroid(sitk.ReadImage(str(label_file)), 6)
    after = physical_centroid(label, 6)
    assert np.allclose(before[:2], after[:2], atol=1.0)


def physical_centroid(label, value: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(label) == value).mean(axis=0)
    return np.asarray(label.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))


def test_predict_model_space_of_a_ct_scan_is_the_training_preprocessing(phantom):
    image_file, label_file = phantom
    trained_image, trained_label = preprocess_sabs_case(image_file, label_file)
    scan = to_model_space(read_scan(image_file), SABS, "ct", read_scan(label_file, label=True), name="phantom")
    np.testing.assert_allclose(scan.image, zscore(sitk.GetArrayFromImage(trained_image)), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(scan.label, sitk.GetArrayFromImage(trained_label))
    assert any("[-125, 275] HU" in step for step in scan.steps)
    assert any("32 px cropped" in step for step in scan.steps)
    # the model-space liver mapped back onto the scan's own grid covers the phantom's liver
    back = to_original_grid((scan.label == 6).astype(np.float32), scan) > 0.5
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) == 6
    assert 2 * (back & truth).sum() / (back.sum() + truth.sum()) > 0.95
