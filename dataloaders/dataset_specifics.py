"""Registry of the data sets the framework knows: labels, folds, defaults.

Every data-set fact used anywhere in the project lives here (label ids and names, the raw-to-training label
map, default test labels, default supervoxel size, EP1 folds, modality, normalisation, target spacing).

Example:
    >>> spec = get_dataset_spec("SABS")
    >>> spec.label_id("liver")
    6
    >>> spec.fold_positions(4, 30)
    [0, 24, 25, 26, 27, 28, 29]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

__all__ = ["DatasetSpec", "DATASETS", "get_dataset_spec", "dataset_names"]


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one data set.

    Attributes:
        name: Registry key ("CHAOST2", "SABS", "CMR", "SYNTH").
        modality: "MR" or "CT".
        label_names: {training id: organ name}; background (0) is not listed.
        raw_label_map: {value on disk: training id}; identity for all sets but CMR.
        test_labels: Default test classes (training ids) of the benchmark.
        n_sv: Default supervoxel minimum size (the ``supervoxels_<n_sv>`` folder name).
        n_folds: Number of EP1 folds.
        fold_step: Distance between the first positions of consecutive folds; a fold holds
            ``fold_step + 1`` volumes, the last fold the remaining ones plus position 0. ``None`` derives it
            from the number of volumes (``n_volumes // n_folds``), used by SYNTH.
        n_volumes: Number of volumes in the public release (``None``: any).
        spacing: Spacing (z, y, x) in mm of the volumes the model is trained on: the pre-processing's target
            (CHAOST2, CMR), the phantoms' typical spacing (SYNTH: 320 mm field of view / 128 px in-plane, the
            mean 6.5 mm of the U(5, 8) mm slice thickness); ``None`` where it varies per volume (SABS:
            in-plane spacing scaled by ``inplane_scale``, z kept).
        inplane_scale: SABS only: in-plane spacing multiplier of the pre-processing.
        border_crop: Pixels removed from every in-plane edge before resampling (SABS: 32).
        crop_size: In-plane size (H, W) of the pre-processed volumes.
        orientation: Orientation code (``SimpleITK.DICOMOrient``) of the stored volumes: "LAS" (direction
            diag(1, -1, 1): rows run towards anterior, columns towards the patient's left) for CHAOST2 and
            SYNTH; ``None`` where the pre-processing keeps the scanner's orientation (CMR, SABS).
        normalisation: Load-time intensity normalisation, "zscore" (per volume).
        case_ids: Volume ids of the public release (informative; loading lists the folder).
    """

    name: str
    modality: str
    label_names: Mapping[int, str]
    raw_label_map: Mapping[int, int]
    test_labels: tuple
    n_sv: int
    n_folds: int = 5
    fold_step: Optional[int] = None
    n_volumes: Optional[int] = None
    spacing: Optional[tuple] = None
    inplane_scale: Optional[float] = None
    border_crop: int = 0
    crop_size: tuple = (256, 256)
    orientation: Optional[str] = None
    normalisation: str = "zscore"
    case_ids: tuple = field(default=())

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def label_ids(self) -> tuple:
        """Training label ids, sorted (background 0 excluded)."""
        return tuple(sorted(self.label_names))

    def label_id(self, name: str) -> int:
        """Training id of an organ name (case-insensitive).

        Raises:
            ValueError: Unknown name; the message lists the valid names.
        """
        for lid, lname in self.label_names.items():
            if lname.lower() == str(name).lower():
                return lid
        valid = ", ".join(f"{n}={i}" for i, n in sorted(self.label_names.items()))
        raise ValueError(f"{self.name}: unknown label name {name!r}; valid: {valid}")

    def check_labels(self, labels: Iterable[int]) -> tuple:
        """Validate training label ids.

        Args:
            labels: Iterable of ints (training ids, not raw values).

        Returns:
            The labels as a tuple of ints, order kept.

        Raises:
            ValueError: A label is not a known id of this data set (message lists the valid ids).
        """
        out = []
        for lab in labels:
            try:
                lid = int(lab)
            except (TypeError, ValueError):
                lid = None
            if lid is None or lid != lab or lid not in self.label_names:
                valid = ", ".join(f"{i} ({n})" for i, n in sorted(self.label_names.items()))
                raise ValueError(f"{self.name}: unknown label {lab!r}; valid ids: {valid}")
            out.append(lid)
        return tuple(out)

    def fold_step_for(self, n_volumes: int) -> int:
        """Fold step (fold size - 1) for a data set with ``n_volumes`` volumes."""
        if self.fold_step is not None:
            return self.fold_step
        return max(1, n_volumes // self.n_folds)

    def fold_positions(self, fold: int, n_volumes: int) -> list:
        """Positions (in the numerically sorted id list) of the volumes of an EP1 test fold.

        Folds overlap by one volume: fold f = positions f*step .. f*step+step; the last fold takes the
        remaining positions up to ``n_volumes - 1`` plus position 0 (CHAOST2: {0-4}, {4-8}, {8-12},
        {12-16}, {16-19, 0}).

        Args:
            fold: Fold index in [0, n_folds).
            n_volumes: Number of volumes of the data set.

        Returns:
            Sorted list of positions.

        Raises:
            ValueError: Fold out of range or too few volumes for the fold rule.
        """
        if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < self.n_folds:
            raise ValueError(f"{self.name}: fold must be an int in [0, {self.n_folds - 1}], got {fold!r}")
        step = self.fold_step_for(n_volumes)
        last_start = (self.n_folds - 1) * step
        if n_volumes < last_start + 1:
            raise ValueError(
                f"{self.name}: {n_volumes} volumes are too few for {self.n_folds} folds with step {step} "
                f"(need at least {last_start + 1})"
            )
        if fold < self.n_folds - 1:
            return list(range(fold * step, fold * step + step + 1))
        return sorted({0, *range(last_start, n_volumes)})

    def map_raw_labels(self, raw_values: Iterable[int]) -> dict:
        """{raw value: training id} for the given raw values, 0 -> 0; unknown values raise ValueError."""
        out = {}
        for v in raw_values:
            v = int(v)
            if v == 0:
                out[v] = 0
            elif v in self.raw_label_map:
                out[v] = self.raw_label_map[v]
            else:
                raise ValueError(
                    f"{self.name}: unknown raw label value {v}; valid: 0, "
                    + ", ".join(str(k) for k in sorted(self.raw_label_map))
                )
        return out


def _identity(ids: Iterable[int]) -> dict:
    return {i: i for i in ids}


_CHAOS_LABELS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
_SABS_LABELS = {
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "ivc",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "right_adrenal",
    13: "left_adrenal",
}
_CMR_LABELS = {1: "lv_myo", 2: "lv_bp", 3: "rv"}

DATASETS: Mapping[str, DatasetSpec] = {
    "CHAOST2": DatasetSpec(
        name="CHAOST2",
        modality="MR",
        label_names=_CHAOS_LABELS,
        raw_label_map=_identity(_CHAOS_LABELS),
        test_labels=(1, 2, 3, 4),
        n_sv=5000,
        fold_step=4,
        n_volumes=20,
        spacing=(7.7, 1.25, 1.25),
        orientation="LAS",
        case_ids=(1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39),
    ),
    "SABS": DatasetSpec(
        name="SABS",
        modality="CT",
        label_names=_SABS_LABELS,
        raw_label_map=_identity(_SABS_LABELS),
        test_labels=(1, 2, 3, 6),  # liver is 6 (peer code wrongly evaluates 4, the gallbladder)
        n_sv=5000,
        fold_step=6,
        n_volumes=30,
        spacing=None,
        inplane_scale=1.75,
        border_crop=32,
        case_ids=tuple(range(30)),
    ),
    "CMR": DatasetSpec(
        name="CMR",
        modality="MR",
        label_names=_CMR_LABELS,
        raw_label_map={200: 1, 500: 2, 600: 3},
        test_labels=(1, 2, 3),
        n_sv=1000,
        fold_step=7,
        n_volumes=35,
        spacing=(7.99, 1.25, 1.25),
        case_ids=tuple(range(1, 36)),
    ),
    "SYNTH": DatasetSpec(
        name="SYNTH",
        modality="MR",
        label_names=_CHAOS_LABELS,
        raw_label_map=_identity(_CHAOS_LABELS),
        test_labels=(1, 2, 3, 4),
        n_sv=1000,
        fold_step=None,
        n_volumes=None,
        spacing=(6.5, 2.5, 2.5),
        crop_size=(128, 128),
        orientation="LAS",
    ),
}


def dataset_names() -> tuple:
    """Names of the registered data sets."""
    return tuple(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up a data set.

    Args:
        name: Registry key (case-insensitive), one of CHAOST2, SABS, CMR, SYNTH.

    Raises:
        ValueError: Unknown name; the message lists the valid names.
    """
    key = str(name).upper()
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[key]
