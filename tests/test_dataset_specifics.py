"""Data-set registry facts."""
import pytest

from dataloaders.dataset_specifics import ct_window_hu, dataset_names, get_dataset_spec


def test_names_and_unknown():
    assert set(dataset_names()) == {"CHAOST2", "SABS", "CMR", "SYNTH"}
    assert get_dataset_spec("chaost2").name == "CHAOST2"
    with pytest.raises(ValueError, match="unknown data set 'FOO'; valid: CHAOST2, SABS, CMR, SYNTH"):
        get_dataset_spec("FOO")


def test_label_facts():
    sabs = get_dataset_spec("SABS")
    assert sabs.label_id("liver") == 6
    assert sabs.label_names[4] == "gallbladder"
    assert sabs.test_labels == (1, 2, 3, 6)
    assert len(sabs.label_names) == 13
    chaos = get_dataset_spec("CHAOST2")
    assert chaos.label_names == {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
    assert chaos.test_labels == (1, 2, 3, 4)
    cmr = get_dataset_spec("CMR")
    assert cmr.raw_label_map == {200: 1, 500: 2, 600: 3}
    assert cmr.map_raw_labels([0, 200, 500, 600]) == {0: 0, 200: 1, 500: 2, 600: 3}
    assert cmr.test_labels == (1, 2, 3)
    assert cmr.n_sv == 1000 and chaos.n_sv == 5000 and sabs.n_sv == 5000
    assert chaos.modality == "MR" and sabs.modality == "CT"
    assert get_dataset_spec("SYNTH").label_names == chaos.label_names


def test_unknown_labels():
    spec = get_dataset_spec("CHAOST2")
    assert spec.check_labels([1, 4]) == (1, 4)
    with pytest.raises(ValueError, match=r"CHAOST2: unknown label 6; valid ids: 1 \(liver\)"):
        spec.check_labels([1, 6])
    with pytest.raises(ValueError, match="unknown label name 'heart'"):
        spec.label_id("heart")
    with pytest.raises(ValueError, match=r"^unknown label value\(s\) \[300\] for CMR; valid: 0, 200, 500, 600$"):
        get_dataset_spec("CMR").map_raw_labels([300])


def test_folds_chaos():
    spec = get_dataset_spec("CHAOST2")
    folds = [spec.fold_positions(f, 20) for f in range(5)]
    assert folds == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16], [0, 16, 17, 18, 19]]


def test_folds_cmr_sabs():
    cmr = get_dataset_spec("CMR")
    assert cmr.fold_positions(0, 35) == list(range(0, 8))
    assert cmr.fold_positions(1, 35) == list(range(7, 15))
    assert cmr.fold_positions(2, 35) == list(range(14, 22))
    assert cmr.fold_positions(3, 35) == list(range(21, 29))
    assert cmr.fold_positions(4, 35) == [0] + list(range(28, 35))
    sabs = get_dataset_spec("SABS")
    assert [len(sabs.fold_positions(f, 30)) for f in range(5)] == [7, 7, 7, 7, 7]
    assert sabs.fold_positions(0, 30) == list(range(0, 7))
    assert sabs.fold_positions(3, 30) == list(range(18, 25))
    assert sabs.fold_positions(4, 30) == [0] + list(range(24, 30))


def test_folds_synth_and_errors():
    spec = get_dataset_spec("SYNTH")
    assert [spec.fold_positions(f, 10) for f in range(5)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [0, 8, 9]]
    covered = set().union(*(spec.fold_positions(f, 10) for f in range(5)))
    assert covered == set(range(10))
    with pytest.raises(ValueError, match="fold must be an int in"):
        spec.fold_positions(5, 10)
    with pytest.raises(ValueError, match="too few"):
        get_dataset_spec("CHAOST2").fold_positions(0, 16)
    assert get_dataset_spec("SYNTH").fold_positions(4, 5) == [0, 4]


def test_synth_is_chaos_with_its_own_size_and_no_raw_release():
    chaos, synth = get_dataset_spec("CHAOST2"), get_dataset_spec("SYNTH")
    for key in ("label_names", "raw_label_map", "test_labels", "modality", "orientation", "normalisation"):
        assert getattr(synth, key) == getattr(chaos, key), key
    assert (synth.n_sv, synth.spacing, synth.crop_size) == (1000, (6.5, 2.5, 2.5), (128, 128))
    assert synth.raw_layout is None and synth.png_label_values is None and synth.case_ids == ()
    assert synth.fold_step is None and synth.n_volumes is None
    assert chaos.raw_layout == "chaos_dicom_png" and chaos.fold_step == 4 and len(chaos.case_ids) == 20


def test_check_raw_values_message():
    cmr = get_dataset_spec("CMR")
    cmr.check_raw_values([0, 200, 500, 600], "patient1_C0_manual.nii.gz")  # all known: no error
    with pytest.raises(ValueError, match=r"^patient1_C0_manual.nii.gz: unknown label value\(s\) \[1, 300\] for CMR; "
                                         r"valid: 0, 200, 500, 600$"):
        cmr.check_raw_values([300, 0, 1, 200, 300], "patient1_C0_manual.nii.gz")
    with pytest.raises(ValueError, match=r"unknown label value\(s\) \[14, 15, 16, 17, 18, 19, 20, 21, 22, 23\] "
                                         r"for SABS; valid: 0, 1, 2, .*, 13$"):
        get_dataset_spec("SABS").check_raw_values(range(30), "x")  # at most ten listed


def test_ct_window():
    assert get_dataset_spec("SABS").intensity_window_hu == (-125.0, 275.0)
    assert ct_window_hu(get_dataset_spec("SABS")) == (-125.0, 275.0)
    assert get_dataset_spec("CHAOST2").intensity_window_hu is None
    assert ct_window_hu(get_dataset_spec("CHAOST2")) == (-125.0, 275.0)  # CT scans fed to an MR model
