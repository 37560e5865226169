"""Radiological display orientation from the direction matrix, and the overlay writer."""
import numpy as np
import pytest
import SimpleITK as sitk

from util.visualisation import radiological_view, save_overlay

LAS = (1, 0, 0, 0, -1, 0, 0, 0, 1)  # CHAOST2 / SYNTH: rows towards anterior
# axial planes (slice normal along z) in several storage orders, and one coronal acquisition
AXIAL = {
    "LPS identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "LAS": LAS,
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "RPI": (-1, 0, 0, 0, 1, 0, 0, 0, -1),
    "transposed (i->P, j->L)": (0, 1, 0, 1, 0, 0, 0, 0, -1),
    "transposed (i->A, j->R)": (0, -1, 0, -1, 0, 0, 0, 0, -1),
    "slightly oblique LAS": (0.995, 0.0998, 0, 0.0998, -0.995, 0, 0, 0, 1),
}
CORONAL = {"coronal (i->L, j->I, k->A)": (1, 0, 0, 0, 0, -1, 0, -1, 0),
           "coronal (i->R, j->S, k->P)": (-1, 0, 0, 0, 0, 1, 0, 1, 0)}


def _marked_slice(direction, first_point, second_point):
    """A 9x11x7 volume with two marker voxels at physical points (mm); returns the slice holding them."""
    img = sitk.Image([9, 11, 7], sitk.sitkUInt8)
    img.SetDirection(tuple(float(v) for v in direction))
    img.SetOrigin(tuple(-np.asarray(img.TransformContinuousIndexToPhysicalPoint((4.0, 5.0, 3.0)))))  # centre at 0
    arr = np.zeros((7, 11, 9), np.uint8)
    ks = set()
    for value, point in ((1, first_point), (2, second_point)):
        i, j, k = img.TransformPhysicalPointToIndex(point)
        arr[k, j, i] = value
        ks.add(k)
    assert len(ks) == 1, "both markers must lie in one slice"
    return arr[ks.pop()]


def _quadrant(picture, value):
    rows, cols = np.nonzero(picture == value)
    h, w = picture.shape
    return ("top" if rows[0] < (h - 1) / 2 else "bottom") + "-" + ("left" if cols[0] < (w - 1) / 2 else "right")


@pytest.mark.parametrize("name", sorted(AXIAL))
def test_axial_anterior_up_patient_right_on_picture_left(name):
    # LPS physical axes: right-anterior = (-x, -y), left-posterior = (+x, +y)
    picture = radiological_view(_marked_slice(AXIAL[name], (-3, -3, 0), (3, 3, 0)), AXIAL[name])
    assert _quadrant(picture, 1) == "top-left"
    assert _quadrant(picture, 2) == "bottom-right"


@pytest.mark.parametrize("name", sorted(CORONAL))
def test_coronal_superior_up_patient_right_on_picture_left(name):
    picture = radiological_view(_marked_slice(CORONAL[name], (-3, 0, 2), (3, 0, -2)), CORONAL[name])
    assert _quadrant(picture, 1) == "top-left"  # right-superior
    assert _quadrant(picture, 2) == "bottom-right"  # left-inferior


def test_las_flips_rows_only():
    slice_hw = np.arange(6).reshape(2, 3)
    assert radiological_view(slice_hw, LAS).tolist() == [[3, 4, 5], [0, 1, 2]]


def test_save_overlay_draws_in_radiological_orientation(tmp_path):
    import cv2

    image = np.zeros((8, 10), np.float32)
    image[0, 0] = 1.0  # first stored row of a LAS volume is the most posterior one
    pred = np.zeros((8, 10), np.uint8)
    pred[0:3, 0:3] = 1
    path = save_overlay(tmp_path / "o.png", image, np.zeros_like(pred), pred, scale=1, direction=LAS)
    picture = cv2.imread(str(path))
    assert picture.shape == (8, 10, 3)
    assert picture[7, 0].tolist() == [0, 0, 255]  # the red contour sits at the bottom (posterior) now
    assert picture[0, 0].tolist() == [0, 0, 0]
