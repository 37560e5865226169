"""EP1 folds: which volumes a run trains on and which it is evaluated on.

A fold is a set of positions in the numerically sorted list of volume ids (the rule lives with each data
set in the registry, ``DatasetSpec.fold_positions``). Because positions, not ids, define a fold, one missing
or extra volume would silently shift every fold: :func:`fold_volume_ids` checks the data folder against the
registry's public ids before any split is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from dataloaders.dataset_specifics import DatasetSpec
from dataloaders.volume_io import list_case_ids

__all__ = ["split_fold", "fold_volume_ids"]


def split_fold(case_ids: Sequence[int], spec: DatasetSpec, fold: int) -> tuple:
    """Training and test ids of an EP1 fold.

    Args:
        case_ids: All volume ids of the data set (any order; sorted numerically here).
        spec: Data set facts (fold rule).
        fold: Evaluation fold.

    Returns:
        (train_ids, test_ids), both sorted numerically; train = all volumes not in the fold.
    """
    ids = sorted(int(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate volume ids in {ids}")
    pos = set(spec.fold_positions(fold, len(ids)))
    test = [cid for p, cid in enumerate(ids) if p in pos]
    train = [cid for p, cid in enumerate(ids) if p not in pos]
    return train, test


def fold_volume_ids(data_dir: Union[str, Path], spec: DatasetSpec, fold: int, volumes: Optional[Sequence[int]] = None) -> tuple:
    """Training and test ids of an EP1 fold, with the data folder checked against the registry.

    Folds are positions in the sorted id list, so one missing volume would silently shift every fold. When
    the registry knows the public ids (``spec.case_ids``), the folder must hold exactly those.

    Args:
        data_dir: Data set folder (``image_<id>.nii.gz`` files).
        spec: Data set facts.
        fold: Evaluation fold.
        volumes: Explicit volume ids to use instead of the registry's (each must be in the folder).

    Returns:
        (train_ids, test_ids) as :func:`split_fold`.

    Raises:
        ValueError: one line naming the missing or unexpected ids.
    """
    found = list_case_ids(data_dir)
    if volumes is not None:
        wanted = sorted({int(v) for v in volumes})
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise ValueError(f"{data_dir}: volume id(s) {missing} of config key 'volumes' have no image file")
        return split_fold(wanted, spec, fold)
    if spec.case_ids:
        missing = sorted(set(spec.case_ids) - set(found))
        unexpected = sorted(set(found) - set(spec.case_ids))
        if missing or unexpected:
            raise ValueError(
                f"{data_dir}: {spec.name} has the {len(spec.case_ids)} public volumes {list(spec.case_ids)}; "
                f"missing id(s) {missing}, unexpected id(s) {unexpected} would shift the EP1 folds "
                "(set config key 'volumes' to the ids to use on purpose)")
    return split_fold(found, spec, fold)
