"""The path from model output to Dice, with stub models whose every output value is known.

- Positions: a stub returns its query input as the foreground probability; the case images are ramps that
  differ along rows and columns, so a mirrored, transposed or shifted resize back to the label grid no
  longer gives the ramp back.
- Chunks: a stub returns its support image's value (each support slice has its own); every query slice
  must carry the value of the support slice that the documented EP1 rule assigns to it, and the copy
  baseline must be that support slice's mask.
- Decision and fusion: a stub returns probability bands at 0.3, 0.4999, 0.5, 0.5001 and 0.7; the Dice,
  the copy baseline's Dice and the written label map are worked out by hand below.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.volume_io import Case
from evaluation.ep1_fold import EP1Options, evaluate_fold, predict_query

CPU = torch.device("cpu")
SPEC = get_dataset_spec("SYNTH")
LIVER, SPLEEN = 1, 4


class Echo:
    """Foreground probability = channel 0 of the query it is given + the mean of its support image."""

    def encode_support(self, image, mask):
        assert image.shape[0] == 1 and image.shape[1] == 3 and mask.shape == (1, *image.shape[-2:])
        return float(image[0, 0].mean())

    def segment(self, code, query):
        p = query[:, 0] + code
        return torch.stack([1 - p, p], dim=1), {}


def ramp(h: int, w: int) -> np.ndarray:
    """0.3 down the rows, 0.2 across the columns: a transpose, a mirror or a shift changes it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return 0.3 * y / (h - 1) + 0.2 * x / (w - 1)


def case(case_id, image, label) -> Case:
    return Case(case_id, np.asarray(image, np.float32), np.asarray(label, np.uint8), None, (1.0, 1.0, 1.0),
                f"image_{case_id}.nii.gz")


@pytest.mark.parametrize("image_size", [None, 24, 56])
def test_resized_back_probabilities_land_where_the_model_put_them(image_size):
    z, h, w = 12, 40, 40
    query_image = np.stack([ramp(h, w) + 0.01 * k for k in range(z)])
    query_label = np.zeros((z, h, w), np.uint8)
    query_label[2:10, 10:30, 12:28] = LIVER
    support_label = np.zeros((z, h, w), np.uint8)
    support_label[1:8, 8:20, 8:20] = LIVER
    support, query = case(1, np.zeros((z, h, w)), support_label), case(2, query_image, query_label)
    result = predict_query(Echo(), support, query, LIVER, n_part=3, eval_batch=3, device=CPU, image_size=image_size)
    assert result["slices"].tolist() == list(range(2, 10))
    assert result["prob"].shape == (8, h, w)
    # resizing down and back keeps a ramp up to the filters' rounding (measured below 7e-4 two pixels in from
    # the border); one pixel of shift costs 5e-3, a mirror or a transpose about 0.1
    m, tolerance = (0, 1e-6) if image_size is None else (2, 2e-3)
    inner = (slice(None), slice(m, h - m), slice(m, w - m))
    expected = np.stack([query_image[k] for k in result["slices"]])
    np.testing.assert_allclose(result["prob"][inner], expected[inner], rtol=0, atol=tolerance)
    np.testing.assert_array_equal(result["target"], (query_label[2:10] == LIVER).astype(np.uint8))


def documented_support_slice(support_labelled: np.ndarray, query_labelled: np.ndarray, n_part: int) -> dict:
    """Query slice -> support slice by the EP1 rule of docs/protocol.md, written out independently: the
    query's labelled slices cut at ``int(linspace(0, n, n_part + 1))``; chunk k takes the support's labelled
    slice at position ``int((2k + 1) / (2 n_part) * len)``."""
    bounds = [int(b) for b in np.linspace(0, len(query_labelled), n_part + 1)]
    plan = {}
    for k in range(n_part):
        chosen = support_labelled[int((2 * k + 1) / (2 * n_part) * len(support_labelled))]
        for q in query_labelled[bounds[k]:bounds[k + 1]]:
            plan[int(q)] = int(chosen)
    return plan


@pytest.mark.parametrize("n_part", [1, 3, 4])
def test_each_chunk_uses_its_support_slice_and_the_copy_baseline_is_that_slice_mask(n_part):
    z, h, w = 14, 16, 16
    support_label = np.zeros((z, h, w), np.uint8)
    for k in range(1, 12):  # the liver moves one column per slice: every support slice's mask differs
        support_label[k, 4:9, k:k + 4] = LIVER
    support_image = np.stack([np.full((h, w), 0.05 * k, np.float32) for k in range(z)])
    query_label = np.zeros((z, h, w), np.uint8)
    query_label[3:12, 6:12, 5:11] = LIVER
    support, query = case(1, support_image, support_label), case(2, np.zeros((z, h, w)), query_label)
    result = predict_query(Echo(), support, query, LIVER, n_part=n_part, eval_batch=2, device=CPU)
    plan = documented_support_slice(np.arange(1, 12), np.arange(3, 12), n_part)
    assert sorted(result["slices"].tolist()) == sorted(plan)
    for i, q in enumerate(result["slices"].tolist()):
        s = plan[q]
        np.testing.assert_allclose(result["prob"][i], 0.05 * s, rtol=0, atol=1e-6, err_msg=f"query slice {q}")
        np.testing.assert_array_equal(result["copy"][i], (support_label[s] == LIVER).astype(np.uint8))
        np.testing.assert_array_equal(result["target"][i], (query_label[q] == LIVER).astype(np.uint8))
        assert not np.array_equal(result["copy"][i], result["target"][i])  # the two masks can be told apart


BANDS = (0.3, 0.4999, 0.5, 0.5001, 0.7)  # liver probability by pairs of columns


class Bands:
    """Liver (recognised by its support mask in the top rows): probability by column band; spleen: 0.5 in
    the top half, 0.5001 in the bottom half."""

    def encode_support(self, image, mask):
        return LIVER if bool(mask[0, 0].any()) else SPLEEN

    def segment(self, label, query):
        n, _, h, w = query.shape
        if label == LIVER:
            p = torch.tensor(np.repeat(BANDS, 2), dtype=torch.float32).expand(n, h, w)
        else:
            p = torch.full((n, h, w), 0.5001)
            p[:, : h // 2] = 0.5
        return torch.stack([1 - p, p], dim=1), {}


def write_case(tmp_path, case_id: int, label: np.ndarray) -> Case:
    path = tmp_path / f"image_{case_id}.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(label.shape, np.float32)), str(path))
    return Case(case_id, np.zeros(label.shape, np.float32), label, None, (1.0, 1.0, 1.0), path)


def test_foreground_is_above_half_and_the_label_map_keeps_the_most_probable_class(tmp_path):
    support = np.zeros((4, 10, 10), np.uint8)
    support[:, 0:3] = LIVER  # rows 0-2
    support[:, 8:10] = SPLEEN  # rows 8-9
    query = np.zeros((4, 10, 10), np.uint8)
    query[1:3, 0:5] = LIVER  # rows 0-4 of slices 1-2
    query[1:3, 7:10] = SPLEEN  # rows 7-9
    cases = [write_case(tmp_path, 1, support), write_case(tmp_path, 2, query), write_case(tmp_path, 3, query)]
    options = EP1Options(test_labels=(LIVER, SPLEEN), supp_idx=0, n_part=3, eval_batch=1)
    summary = evaluate_fold(Bands(), cases, SPEC, options, CPU, tmp_path / "out")

    # liver: columns 6-9 (0.5001, 0.7) are foreground in every row: TP 5 x 4, FP 5 x 4, FN 5 x 6 per slice
    liver = summary["classes"]["liver"]
    assert liver["model"]["dice"] == pytest.approx(2 * 20 / (2 * 20 + 20 + 30))
    assert liver["model"]["precision"] == pytest.approx(0.5) and liver["model"]["recall"] == pytest.approx(0.4)
    # spleen: rows 5-9 (0.5001) are foreground, rows 0-4 (exactly 0.5) are not: TP 3 x 10, FP 2 x 10
    spleen = summary["classes"]["spleen"]
    assert spleen["model"]["dice"] == pytest.approx(2 * 30 / (2 * 30 + 20))
    # copy baseline: the support's masks (liver rows 0-2, spleen rows 8-9), not the query's own labels
    assert liver["copy_support"]["dice"] == pytest.approx(2 * 30 / (2 * 30 + 20))
    assert spleen["copy_support"]["dice"] == pytest.approx(2 * 20 / (2 * 20 + 10))

    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "predictions" / "query_2.nii.gz")))
    # rows 0-4: spleen at exactly 0.5 never wins; liver where above 0.5. Rows 5-9: spleen 0.5001 wins over
    # liver's 0.3-0.5, ties with liver's 0.5001 (the class listed first keeps it) and loses to 0.7
    top = [0] * 6 + [LIVER] * 4
    bottom = [SPLEEN] * 6 + [LIVER] * 4
    for z in (1, 2):
        assert written[z].tolist() == [top] * 5 + [bottom] * 5
    assert not written[0].any() and not written[3].any()  # slices without the organs are not segmented
