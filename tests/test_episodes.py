"""Training episodes: shapes, dtypes, masks, adjacency, Setting 2, determinism, DataLoader workers."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.episodes import (
    GroundTruthEpisodes,
    SupervoxelEpisodes,
    build_training_cases,
    build_training_episodes,
    excluded_slices,
)
from dataloaders.dataset_specifics import get_dataset_spec
from dataloaders.volume_io import Case

H = W = 48


def _case(cid: int, rng: np.random.Generator, z: int = 10) -> Case:
    """Hand-made volume: supervoxels = 4 vertical stripes x 2 z-halves; label: class 1 on slices 2-5, 2 on 4-8."""
    image = rng.normal(size=(z, H, W)).astype(np.float32)
    sv = np.zeros((z, H, W), np.int32)
    for k in range(4):
        sv[:, 4:44, 4 + 10 * k : 14 + 10 * k] = 1 + k
    sv[z // 2 :][sv[z // 2 :] > 0] += 4  # ids 5-8 in the upper half
    sv[:, 30:34, 4:8] = 9  # tiny supervoxel (< 200 px): never drawn
    label = np.zeros((z, H, W), np.uint8)
    label[2:6, 10:30, 10:30] = 1
    label[4:9, 30:44, 30:44] = 2
    label[1:9, 2:14, 28:46] = 3
    return Case(cid, image, label, sv, (8.0, 2.5, 2.5), f"image_{cid}.nii.gz")


@pytest.fixture
def cases():
    rng = np.random.default_rng(0)
    return [_case(1, rng), _case(2, rng, z=12)]


def _check_item(item, n_shot=1):
    assert item["support_images"].shape == (n_shot, 3, H, W) and item["support_images"].dtype == torch.float32
    assert item["support_masks"].shape == (n_shot, H, W) and item["support_masks"].dtype == torch.float32
    assert item["query_images"].shape == (1, 3, H, W) and item["query_images"].dtype == torch.float32
    assert item["query_masks"].shape == (1, H, W) and item["query_masks"].dtype == torch.int64
    for m in (item["support_masks"], item["query_masks"]):
        assert set(torch.unique(m).tolist()) <= {0, 1} and m.flatten(1).sum(1).min() > 0
    assert torch.equal(item["support_images"][:, 0], item["support_images"][:, 2])


def test_shapes_and_adjacency(cases):
    ds = SupervoxelEpisodes(cases, n_episodes=40, augment=False, seed=3)
    assert len(ds) == 40
    by_id = {c.case_id: c for c in cases}
    for i in range(40):
        item = ds[i]
        _check_item(item)
        zs = item["slice_indices"].tolist()
        assert abs(zs[0] - zs[1]) == 1
        case = by_id[int(item["case_id"])]
        r = int(item["region_id"])
        assert r != 9 and r != 0
        assert torch.equal(item["query_masks"][0], torch.from_numpy((case.supervoxels[zs[1]] == r).astype(np.int64)))
        assert torch.equal(item["query_images"][0, 0], torch.from_numpy(case.image[zs[1]]))
        larger = max(int((case.supervoxels[z] == r).sum()) for z in zs)
        assert larger >= 200
    with pytest.raises(IndexError):
        ds[40]


def test_swap_and_augment_balance(cases):
    ds = SupervoxelEpisodes(cases, n_episodes=200, augment=True, seed=1)
    order = [int(ds[i]["slice_indices"][0] > ds[i]["slice_indices"][1]) for i in range(200)]
    assert 60 < sum(order) < 140  # supports above and below the query
    for i in range(20):
        _check_item(ds[i])


def test_n_shot(cases):
    ds = SupervoxelEpisodes(cases, n_episodes=20, n_shot=3, augment=True, seed=2)
    for i in range(20):
        item = ds[i]
        _check_item(item, n_shot=3)
        zs = item["slice_indices"].tolist()
        assert np.all(np.abs(np.diff(zs)) == 1) and len(set(zs)) == 4
        # the query is at one end of the window, next to a support
        assert zs[-1] in (min(zs), max(zs))


def test_determinism(cases):
    a = SupervoxelEpisodes(cases, n_episodes=10, seed=7)
    b = SupervoxelEpisodes(cases, n_episodes=10, seed=7)
    c = SupervoxelEpisodes(cases, n_episodes=10, seed=8)
    for i in (0, 5, 9):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(a[i]["query_images"], c[i]["query_images"]) for i in range(10))
    # order of access does not matter
    assert torch.equal(a[9]["support_images"], b[9]["support_images"])


def test_dataloader_two_workers(cases):
    ds = SupervoxelEpisodes(cases, n_episodes=8, seed=4)
    ref = [ds[i] for i in range(8)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 4
    assert batches[0]["support_images"].shape == (2, 1, 3, H, W)
    for b, batch in enumerate(batches):
        for j in range(2):
            assert torch.equal(batch["query_images"][j], ref[2 * b + j]["query_images"])
            assert torch.equal(batch["support_masks"][j], ref[2 * b + j]["support_masks"])


def test_excluded_slices_any_vs_all():
    label = np.zeros((6, 4, 4), np.uint8)
    label[1, 0, 0] = 1
    label[2, 0, 0], label[2, 1, 1] = 1, 2
    label[3, 1, 1] = 2
    label[4, 2, 2] = 3
    assert excluded_slices(label, (1, 2), "any").tolist() == [False, True, True, True, False, False]
    assert excluded_slices(label, (1, 2), "all").tolist() == [False, False, True, False, False, False]
    assert not excluded_slices(label, (), "any").any()
    with pytest.raises(ValueError, match="exclude_mode"):
        excluded_slices(label, (1,), "some")


def test_setting2_exclusion(cases):
    ex = (1, 2)
    for mode in ("any", "all"):
        ds = SupervoxelEpisodes(cases, n_episodes=150, exclude_labels=ex, exclude_mode=mode, augment=False, seed=0)
        by_id = {c.case_id: c for c in cases}
        seen = set()
        for i in range(150):
            item = ds[i]
            lab = by_id[int(item["case_id"])].label
            for z in item["slice_indices"].tolist():
                has = [bool((lab[z] == c).any()) for c in ex]
                assert not (any(has) if mode == "any" else all(has))
                seen.add(z)
        if mode == "all":
            assert {2, 3} & seen  # slices with only one test class remain in the peer mode


def test_ground_truth_episodes(cases):
    ds = GroundTruthEpisodes(cases, n_episodes=30, test_labels=(1, 2), augment=False, seed=0)
    for i in range(30):
        item = ds[i]
        _check_item(item)
        assert int(item["region_id"]) == 3  # only the training class remains
    with pytest.raises(ValueError, match="no training class"):
        GroundTruthEpisodes(cases, n_episodes=3, test_labels=(1, 2, 3))


def test_errors(cases):
    with pytest.raises(ValueError, match="n_shot must be >= 1"):
        SupervoxelEpisodes(cases, 4, n_shot=0)
    bare = [Case(1, cases[0].image, None, None, (1, 1, 1), "image_1.nii.gz")]
    with pytest.raises(ValueError, match="image_1.nii.gz: supervoxels not loaded"):
        SupervoxelEpisodes(bare, 4)
    no_label = [Case(1, cases[0].image, None, cases[0].supervoxels, (1, 1, 1), "image_1.nii.gz")]
    with pytest.raises(ValueError, match="image_1.nii.gz: Setting 2 exclusion needs the label volume"):
        SupervoxelEpisodes(no_label, 4, exclude_labels=(1,))


def test_build_from_files(tmp_path):
    """Cases from disk (synthetic phantoms + hand-made supervoxel files), fold split, Setting 2."""

    from dataloaders.synthetic import generate_synthetic_dataset
    from dataloaders.volume_io import read_nifti, write_nifti_like

    generate_synthetic_dataset(tmp_path, n_volumes=5, size=64, seed=0)
    for cid in range(1, 6):
        img, ref = read_nifti(tmp_path / f"image_{cid}.nii.gz")
        lab, _ = read_nifti(tmp_path / f"label_{cid}.nii.gz")
        z, h, w = img.shape
        sv = (np.arange(w)[None, None, :] // 16 + 4 * (np.arange(h)[None, :, None] // 16) + 1).repeat(z, 0)
        sv = np.where(img > 50, sv, 0).astype(np.int32)
        write_nifti_like(sv, ref, tmp_path / "supervoxels_77" / f"superpix-MIDDLE_{cid}.nii.gz")
    spec = get_dataset_spec("SYNTH")
    cases = build_training_cases(tmp_path, spec, eval_fold=0, n_sv=77, use_gt=False)
    assert [c.case_id for c in cases] == [3, 4, 5]  # fold 0 of 5 volumes = positions {0, 1}
    assert cases[0].supervoxels.dtype == np.uint8
    ds = build_training_episodes(cases, 6, use_gt=False, test_labels=spec.test_labels,
                                 exclude_labels=spec.test_labels, min_pixels=20)
    for i in range(6):
        item = ds[i]
        assert item["support_images"].shape[-2:] == (64, 64)
        lab = {c.case_id: c.label for c in cases}[int(item["case_id"])]
        for z in item["slice_indices"].tolist():
            assert not np.isin(lab[z], spec.test_labels).any()
    gt = build_training_episodes(
        build_training_cases(tmp_path, spec, 0, None, use_gt=True), 4, use_gt=True, test_labels=(1, 4), min_pixels=20
    )
    assert {int(gt[i]["region_id"]) for i in range(4)} <= {2, 3}


def test_spill_mask_grows_by_a_disk():
    from dataloaders.transforms import spill_mask

    mask = np.zeros((7, 7), np.float32)
    mask[3, 3] = 1
    grown = spill_mask(mask, 1)
    assert grown.dtype == np.float32
    assert sorted(zip(*np.nonzero(grown))) == [(2, 3), (3, 2), (3, 3), (3, 4), (4, 3)]  # dy^2 + dx^2 <= 1
    assert int(spill_mask(mask, 2).sum()) == 13  # the 13 offsets with dy^2 + dx^2 <= 4
    assert np.array_equal(spill_mask(mask, 0), mask)
    with pytest.raises(ValueError, match="radius"):
        spill_mask(mask, -1)


def test_support_spill_grows_only_the_support_and_keeps_the_stream(cases):
    exact = SupervoxelEpisodes(cases, n_episodes=12, seed=3, augment=False)
    spilled = SupervoxelEpisodes(cases, n_episodes=12, seed=3, augment=False, support_spill_px=3)
    grew = 0
    for i in range(12):
        a, b = exact[i], spilled[i]
        # same slices, images and query: the spill radius is drawn after everything else
        assert torch.equal(a["slice_indices"], b["slice_indices"]) and torch.equal(a["query_images"], b["query_images"])
        assert torch.equal(a["query_masks"], b["query_masks"])
        assert bool(((b["support_masks"] - a["support_masks"]) >= 0).all())  # a superset of the exact mask
        grew += int(b["support_masks"].sum() > a["support_masks"].sum())
    assert grew >= 6  # radius 0 is drawn a quarter of the time
    with pytest.raises(ValueError, match="support_spill_px"):
        SupervoxelEpisodes(cases, n_episodes=2, support_spill_px=-1)
