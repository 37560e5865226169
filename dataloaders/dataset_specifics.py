"""Registry of the data sets the framework knows: labels, folds, defaults.

Every data-set fact used anywhere in the project lives here (label ids and names, the raw-to-training label
map, default test labels, default supervoxel size, EP1 folds, modality, normalisation, target spacing, and the
raw release's layout and intensity conventions that ``dataloaders.preprocess`` converts). Other modules take
lists of data sets from here (:func:`dataset_names`, :func:`raw_dataset_names`) rather than naming them.

Example:
    >>> spec = get_dataset_spec("SABS")
    >>> spec.label_id("liver")
    6
    >>> spec.fold_positions(4, 30)
    [0, 24, 25, 26, 27, 28, 29]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional

__all__ = ["DatasetSpec", "DATASETS", "get_dataset_spec", "dataset_names", "raw_dataset_names", "ct_window_hu"]


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one data set.

    Attributes:
        name: Registry key ("CHAOST2", "SABS", "CMR", "SYNTH").
        config_name: Name of the Sacred named config that selects this data set (``with chaos``).
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
        raw_layout: How the raw public release is laid out on disk, a key of
            ``dataloaders.preprocess.RAW_LAYOUTS`` ("chaos_dicom_png", "cmr_nifti", "sabs_nifti");
            ``None`` where there is no raw release to pre-process (SYNTH).
        png_label_values: CHAOST2 only: {training id: (lowest, highest) grey value} of the ground-truth PNG
            masks, inclusive ranges around the nominal 63/126/189/252 (challenge documentation).
        intensity_window_hu: CT only: HU window (low, high) clipped and rescaled to [0, 255] by the
            pre-processing.
    """

    name: str
    config_name: str
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
    raw_layout: Optional[str] = None
    png_label_values: Optional[Mapping[int, tuple]] = None
    intensity_window_hu: Optional[tuple] = None

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

    def check_raw_values(self, values: Iterable[int], path: Optional[object] = None) -> None:
        """Check that label values read from disk are raw values of this data set (or background 0).

        Args:
            values: Values found in a label volume (ints, e.g. its ``np.unique``).
            path: The file (or anything printable) they come from, named first in the message; ``None``
                omits it.

        Raises:
            ValueError: "<path>: unknown label value(s) [v, ...] for <NAME>; valid: 0, ..." listing at most
                ten of the unknown values, in increasing order, and every valid one.
        """
        known = {0, *self.raw_label_map}
        unknown = sorted({int(v) for v in values} - known)
        if unknown:
            where = f"{path}: " if path is not None else ""
            raise ValueError(
                f"{where}unknown label value(s) {unknown[:10]} for {self.name}; valid: "
                + ", ".join(str(v) for v in sorted(known))
            )

    def map_raw_labels(self, raw_values: Iterable[int], path: Optional[object] = None) -> dict:
        """{raw value: training id} for the given raw values, 0 -> 0.

        Args:
            raw_values: Values found in a label volume.
            path: The file they come from, named in the error (:meth:`check_raw_values`).

        Raises:
            ValueError: An unknown value (:meth:`check_raw_values`).
        """
        raw_values = [int(v) for v in raw_values]
        self.check_raw_values(raw_values, path)
        return {v: 0 if v == 0 else self.raw_label_map[v] for v in raw_values}


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

_CHAOST2 = DatasetSpec(
    name="CHAOST2",
    config_name="chaos",
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
    raw_layout="chaos_dicom_png",
    png_label_values={1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)},
)

DATASETS: Mapping[str, DatasetSpec] = {
    "CHAOST2": _CHAOST2,
    "SABS": DatasetSpec(
        name="SABS",
        config_name="sabs",
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
        raw_layout="sabs_nifti",
        intensity_window_hu=(-125.0, 275.0),
    ),
    "CMR": DatasetSpec(
        name="CMR",
        config_name="cmr",
        modality="MR",
        label_names=_CMR_LABELS,
        raw_label_map={200: 1, 500: 2, 600: 3},
        test_labels=(1, 2, 3),
        n_sv=1000,
        fold_step=7,
        n_volumes=35,
        spacing=(7.99, 1.25, 1.25),
        case_ids=tuple(range(1, 36)),
        raw_layout="cmr_nifti",
    ),
    # phantoms of the CHAOST2 organs (dataloaders.synthetic): CHAOST2's labels, modality and orientation
    "SYNTH": replace(
        _CHAOST2,
        name="SYNTH",
        config_name="synth",
        n_sv=1000,
        fold_step=None,
        n_volumes=None,
        spacing=(6.5, 2.5, 2.5),
        crop_size=(128, 128),
        case_ids=(),
        raw_layout=None,
        png_label_values=None,
    ),
}

def dataset_names() -> tuple:
    """Names of the registered data sets."""
    return tuple(DATASETS)


def raw_dataset_names() -> tuple:
    """Names of the data sets with a raw public release that ``dataloaders.preprocess`` converts."""
    return tuple(name for name, spec in DATASETS.items() if spec.raw_layout is not None)


def ct_window_hu(spec: DatasetSpec) -> tuple:
    """HU window for CT scans given to a model trained on ``spec``.

    The data set's own window when it has one; otherwise (an MR data set fed CT scans) the window of the
    first registered CT data set, so CT scans always get the intensity range CT models are trained on.

    Raises:
        ValueError: No registered data set has a CT window.
    """
    if spec.intensity_window_hu is not None:
        return spec.intensity_window_hu
    for other in DATASETS.values():
        if other.intensity_window_hu is not None:
            return other.intensity_window_hu
    raise ValueError("no registered data set has a CT intensity window")


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
