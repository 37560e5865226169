"""EP1 test protocol on hand-made label volumes."""
import numpy as np
import pytest

from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.ep1 import build_test_chunks, query_chunk_bounds, support_positions, support_slice_indices
from dataloaders.folds import split_fold
from dataloaders.volume_io import Case


def _case(cid, z, cls_slices, cls=2):
    image = np.arange(z, dtype=np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32)
    label = np.zeros((z, 8, 8), np.uint8)
    for s in cls_slices:
        label[s, 2:5, 2:5] = cls
    label[0, 6, 6] = 1
    return Case(cid, image, label, None, (1.0, 1.0, 1.0), f"image_{cid}.nii.gz")


def test_split_fold_chaos_ids():
    spec = get_dataset_spec("CHAOST2")
    ids = list(spec.case_ids)[::-1]  # order of the input does not matter
    train, test = split_fold(ids, spec, 0)
    assert test == [1, 2, 3, 5, 8] and len(train) == 15 and not set(train) & set(test)
    _, test4 = split_fold(ids, spec, 4)
    assert test4 == [1, 36, 37, 38, 39]  # positions 0, 16-19
    assert test4 == sorted(test4)


def test_support_positions_put_the_configured_support_first():
    assert support_positions(3, 0, rotate=False) == [0]
    assert support_positions(3, 2, rotate=False) == [2]
    assert support_positions(4, 2, rotate=True) == [2, 0, 1, 3]
    with pytest.raises(ValueError, match=r"supp_idx is 2; the fold has 2 volumes \(0..1\)"):
        support_positions(2, 2, rotate=True)
    with pytest.raises(ValueError, match="supp_idx is -1"):
        support_positions(2, -1, rotate=False)


def test_support_slice_positions():
    assert support_slice_indices(6).tolist() == [1, 3, 5]
    assert support_slice_indices(12).tolist() == [2, 6, 10]
    assert support_slice_indices(7).tolist() == [1, 3, 5]  # int(7/6), int(7/2), int(35/6)
    assert support_slice_indices(1).tolist() == [0, 0, 0]
    assert query_chunk_bounds(10).tolist() == [0, 3, 6, 10]
    assert query_chunk_bounds(2).tolist() == [0, 0, 1, 2]


def test_build_chunks_hand_made():
    # support: class 2 on slices 3..14 (12 slices) -> supports at list positions 2, 6, 10 = slices 5, 9, 13
    support = _case(1, 20, range(3, 15))
    # query: class 2 on slices 4..13 (10 slices) -> chunks [4,5,6], [7,8,9], [10..13]
    query = _case(2, 16, range(4, 14))
    chunks = build_test_chunks(support, query, 2)
    assert [c.support_slice for c in chunks] == [5, 9, 13]
    assert [c.slice_indices for c in chunks] == [[4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
    c0 = chunks[0]
    assert c0.support_image.shape == (3, 8, 8) and c0.support_image.dtype == np.float32
    assert np.all(c0.support_image == 5.0)
    assert c0.support_mask.dtype == np.float32 and c0.support_mask.sum() == 9
    assert c0.query_images.shape == (3, 3, 8, 8) and c0.query_images.dtype == np.float32
    assert np.all(c0.query_images[:, 1, 0, 0] == np.array([4, 5, 6]))
    assert c0.query_labels.dtype == np.uint8 and set(np.unique(c0.query_labels)) == {0, 1}
    assert c0.query_labels.sum() == 27  # binary for the class, class 1 ignored
    two = build_test_chunks(support, query, 2, n_part=2)
    assert [c.support_slice for c in two] == [6, 12]  # list positions int(12/4)=3, int(36/4)=9
    assert [c.slice_indices for c in two] == [[4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]


def test_missing_class():
    support = _case(1, 10, [], cls=2)
    query = _case(2, 10, [3, 4])
    with pytest.raises(ValueError, match="image_1.nii.gz: support volume has no slice with class 2"):
        build_test_chunks(support, query, 2)
    with pytest.raises(ValueError, match="image_2.nii.gz: query volume has no slice with class 3"):
        build_test_chunks(_case(3, 5, [1], cls=3), query, 3)


def _touch_images(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        (folder / f"image_{cid}.nii.gz").write_bytes(b"")  # listing only reads names


def test_fold_ids_are_checked_against_the_registry(tmp_path):
    from dataloaders.folds import fold_volume_ids

    spec = get_dataset_spec("CHAOST2")
    _touch_images(tmp_path, spec.case_ids)
    assert fold_volume_ids(tmp_path, spec, 0)[1] == [1, 2, 3, 5, 8]
    (tmp_path / "image_5.nii.gz").unlink()
    (tmp_path / "image_99.nii.gz").write_bytes(b"")
    # without the check, fold 0 would silently become [1, 2, 3, 8, 10]
    with pytest.raises(ValueError, match=r"missing id\(s\) \[5\], unexpected id\(s\) \[99\].*'volumes'") as info:
        fold_volume_ids(tmp_path, spec, 0)
    assert "\n" not in str(info.value)
    # an explicit list is used as given: 19 volumes, positions shift on purpose
    ids = [c for c in spec.case_ids if c != 5]
    train, test = fold_volume_ids(tmp_path, spec, 0, volumes=ids)
    assert test == [1, 2, 3, 8, 10] and 99 not in train and 5 not in train
    with pytest.raises(ValueError, match=r"volume id\(s\) \[5\] of config key 'volumes' have no image file"):
        fold_volume_ids(tmp_path, spec, 0, volumes=spec.case_ids)
