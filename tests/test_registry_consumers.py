"""Command-line choices, defaults and generator facts taken from the data-set registry, not repeated."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataloaders import preprocess, synthetic
from dataloaders.dataset_specifics import DATASETS, dataset_names, get_dataset_spec, raw_dataset_names
from supervoxels import generate_supervoxels


def test_preprocess_choices_are_the_raw_layout_sets(tmp_path, capsys):
    assert raw_dataset_names() == ("CHAOST2", "SABS", "CMR")
    assert {spec.raw_layout for spec in DATASETS.values() if spec.raw_layout} == set(preprocess.RAW_LAYOUTS)
    for name in dataset_names():
        argv = ["--dataset", name, "--raw-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")]
        if name in raw_dataset_names():
            assert preprocess.main(argv) == 2  # accepted; fails only on the missing folder
            assert "raw data folder not found" in capsys.readouterr().err
        else:
            with pytest.raises(SystemExit):
                preprocess.main(argv)
            assert "invalid choice: 'SYNTH'" in capsys.readouterr().err


def test_find_cases_without_raw_layout(tmp_path):
    with pytest.raises(ValueError, match=r"^SYNTH: no raw pre-processing \(valid: CHAOST2, SABS, CMR\)$"):
        preprocess.find_cases("SYNTH", tmp_path)


def _one_volume(folder: Path) -> Path:
    folder.mkdir()
    arr = np.zeros((3, 16, 16), np.float32)
    arr[:, 3:13, 3:13] = 100.0
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "image_1.nii.gz"))
    return folder


@pytest.mark.parametrize("args,n_sv", [
    (["--dataset", "CMR"], 1000),
    (["--dataset", "CHAOST2"], 5000),
    (["--dataset", "SYNTH", "--n-sv", "7"], 7),  # --n-sv overrides the registry
    ([], generate_supervoxels.FALLBACK_N_SV),
])
def test_supervoxel_cli_size_from_dataset(tmp_path, args, n_sv):
    data = _one_volume(tmp_path / "data")
    argv = ["--data-dir", str(data), "--workers", "1", "--no-progress", *args]
    assert generate_supervoxels.main(argv) == 0
    assert [p.name for p in data.glob("supervoxels_*")] == [f"supervoxels_{n_sv}"]


def test_supervoxel_cli_help_names_the_defaults():
    text = " ".join(generate_supervoxels.build_parser().format_help().split())
    assert "CMR 1000" in text and "CHAOST2 5000" in text and "5000 without --dataset" in text
    assert "{" + ",".join(dataset_names()) + "}" in text


def test_named_configs_select_every_data_set():
    from config import NAMED_CONFIGS

    for name, spec in DATASETS.items():
        assert NAMED_CONFIGS[spec.config_name] == {"dataset": name}


def test_synthetic_generator_matches_its_registry_entry():
    spec = get_dataset_spec("SYNTH")
    assert synthetic._ORGAN_LABELS == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert {lid: name for name, lid in synthetic._ORGAN_LABELS.items()} == dict(spec.label_names)
    assert synthetic.FOV_MM / synthetic.DEFAULT_SIZE == spec.spacing[1] == spec.spacing[2]
    assert sum(synthetic.SLICE_THICKNESS_MM) / 2 == spec.spacing[0]  # the registry's spacing is the mean
    assert synthetic.DEFAULT_SIZE == spec.crop_size[0] == spec.crop_size[1]
