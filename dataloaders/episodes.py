"""Training episodes (1-way, n-shot) as torch ``Dataset`` s.

Self-supervised episodes (SSL-ALPNet / ADNet / DMAP style): pick a training volume uniformly, then a
supervoxel and a window of ``n_shot + 1`` consecutive allowed slices that all contain it and whose largest
mask has >= ``min_pixels`` pixels; with p = 0.5 reverse the window; the first ``n_shot`` slices are the
supports, the last one the query. For 1-shot this is "two adjacent slices, swapped with p = 0.5". Two
samplers give the supervoxel and window different probabilities (``sampler``):

- ``public`` (default), the public code's distribution: draw a supervoxel uniformly among those on at
  least ``n_shot + 1`` allowed slices, then uniformly one of its runs of consecutive slices long enough for
  a window, then a start slice uniformly in the run; redraw (same volume) while the window's larger mask
  has fewer than ``min_pixels`` pixels; a supervoxel without a long-enough run sends the draw to a new
  volume, as in the public code. Supervoxels with few valid windows are drawn less often.
- ``valid_windows``: draw a supervoxel uniformly among those with at least one valid window, then one of
  its valid windows uniformly; no redraws. It favours small supervoxels (on CHAOS fold 0, support masks
  under 500 pixels in 25.0 % of the episodes vs 17.2 %).

Both read a per-volume index, built once from per-slice pixel counts, so an episode costs a few
milliseconds whatever the volume size.

Augmentation (``dataloaders.transforms``, profile ``public`` or ``compact``): gamma, then affine + elastic.
``public`` flips one coin for the side (supports or query) that gets the gamma and an independent one for
the side that gets the geometry; ``compact`` flips one coin for the side that gets both.

Supervised episodes (``GroundTruthEpisodes``, the ``use_gt`` option) use the same sampler with the
ground-truth classes as regions, the test classes removed (set to background).

Setting 2 (``exclude_labels`` = test classes): slices whose label contains **any** excluded class are
removed; ``exclude_mode="all"`` reproduces the peer code, which removes only slices containing all of them.

Reproducibility: episode ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` only, so it is the
same in any DataLoader worker and in any process; give DDP ranks different ``seed`` s (e.g. seed + rank).

Items are dicts:
    "support_images": float32 [S, 3, H, W] (S = n_shot; the slice repeated over 3 channels),
    "support_masks":  float32 [S, H, W] in {0, 1},
    "query_images":   float32 [1, 3, H, W],
    "query_masks":    int64 [1, H, W] in {0, 1},
    "case_id":        int64 [] (volume id),
    "region_id":      int64 [] (supervoxel id, or ground-truth class),
    "slice_indices":  int64 [S + 1] (support slices, then the query slice, in the volume).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.dataset_specifics import DatasetSpec
from dataloaders.folds import fold_volume_ids
from dataloaders.transforms import (AUGMENT_PROFILES, AugmentParams, augment_pair, augment_params,
                                   gamma_transform, geometric_transform, spill_mask)
from dataloaders.volume_io import Case, compact_labels, load_cases

__all__ = [
    "SupervoxelEpisodes",
    "GroundTruthEpisodes",
    "excluded_slices",
    "build_training_cases",
    "build_training_episodes",
]

EXCLUDE_MODES = ("any", "all")
SAMPLERS = ("public", "valid_windows")
_MAX_AUG_TRIES = 5
_MAX_DRAWS = 100_000  # public sampler: redraws before giving up (the acceptance rate is far above 1e-5)


def excluded_slices(label: np.ndarray, exclude_labels: Sequence[int], mode: str = "any") -> np.ndarray:
    """Slices to exclude in Setting 2.

    Args:
        label: int [Z, H, W] training label ids.
        exclude_labels: Classes whose slices are excluded (empty: nothing excluded).
        mode: "any" (a slice is excluded when it contains any of the classes; the setting's definition,
            docs/protocol.md) or "all" (only when it contains all of them; the peer-code behaviour).

    Returns:
        bool [Z], True for excluded slices.
    """
    if mode not in EXCLUDE_MODES:
        raise ValueError(f"exclude_mode must be one of {EXCLUDE_MODES}, got {mode!r}")
    z = label.shape[0]
    if len(exclude_labels) == 0:
        return np.zeros(z, dtype=bool)
    present = np.stack([(label == int(c)).reshape(z, -1).any(axis=1) for c in exclude_labels], axis=1)
    return present.any(axis=1) if mode == "any" else present.all(axis=1)


class _VolumeIndex:
    """Per-volume sampling index: for each region, the start slices of its valid windows."""

    def __init__(self, case: Case, regions: np.ndarray, allowed: np.ndarray, window: int, min_pixels: int):
        self.case = case
        self.image = case.image
        self.regions = regions
        z = regions.shape[0]
        n_reg = int(regions.max()) + 1 if regions.size else 1
        counts = np.empty((z, n_reg), dtype=np.int64)
        for k in range(z):
            counts[k] = np.bincount(regions[k].ravel(), minlength=n_reg)
        counts[:, 0] = 0  # background is never a region
        counts[~allowed] = 0
        self.counts = counts
        n_win = z - window + 1
        ids, starts = [], []
        if n_win > 0:
            valid = np.ones((n_win, n_reg), dtype=bool)
            largest = np.zeros((n_win, n_reg), dtype=np.int64)
            for o in range(window):
                part = counts[o : o + n_win]
                valid &= part > 0
                np.maximum(largest, part, out=largest)
            valid &= largest >= min_pixels
            for r in np.flatnonzero(valid.any(axis=0)):
                ids.append(int(r))
                starts.append(np.flatnonzero(valid[:, r]).astype(np.int32))
        self.region_ids = np.asarray(ids, dtype=np.int64)
        self.starts = starts
        # public sampler: regions on >= window allowed slices, and their runs of consecutive slices
        present = counts > 0
        self.run_region_ids = np.flatnonzero(present.sum(axis=0) >= window)
        self.runs = []  # per run region: int64 [n_runs, 2] (first slice, length), runs shorter than window dropped
        for r in self.run_region_ids:
            zs = np.flatnonzero(present[:, r])
            cut = np.flatnonzero(np.diff(zs) != 1)
            first = zs[np.r_[0, cut + 1]]
            length = zs[np.r_[cut, len(zs) - 1]] - first + 1
            keep = length >= window
            self.runs.append(np.stack([first[keep], length[keep]], axis=1))

    @property
    def n_regions(self) -> int:
        return len(self.region_ids)


class _RegionEpisodes(Dataset):
    """Episodes from adjacent slices of a labelled region (shared by the two public classes)."""

    def __init__(
        self,
        cases: Sequence[Case],
        regions: Sequence[np.ndarray],
        n_episodes: int,
        n_shot: int,
        exclude_labels: Sequence[int],
        exclude_mode: str,
        augment: bool,
        seed: int,
        min_pixels: int,
        augment_params: AugmentParams,
        what: str,
        sampler: str = "public",
        support_spill_px: int = 0,
    ):
        if int(n_episodes) < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        if int(n_shot) < 1:
            raise ValueError(f"n_shot must be >= 1, got {n_shot}")
        if exclude_mode not in EXCLUDE_MODES:
            raise ValueError(f"exclude_mode must be one of {EXCLUDE_MODES}, got {exclude_mode!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        if int(support_spill_px) < 0:
            raise ValueError(f"support_spill_px must be >= 0, got {support_spill_px}")
        self.support_spill_px = int(support_spill_px)
        if not cases:
            raise ValueError("no training volumes given")
        self.n_episodes = int(n_episodes)
        self.n_shot = int(n_shot)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.min_pixels = int(min_pixels)
        self.augment_params = augment_params
        self.exclude_labels = tuple(int(c) for c in exclude_labels)
        self.exclude_mode = exclude_mode
        shapes = {tuple(c.image.shape[1:]) for c in cases}
        if len(shapes) != 1:
            raise ValueError(f"training volumes differ in slice size {sorted(shapes)}; pre-process them to one size")
        indexes = []
        for case, reg in zip(cases, regions):
            if self.exclude_labels:
                if case.label is None:
                    raise ValueError(f"{case.image_path}: Setting 2 exclusion needs the label volume, not loaded")
                allowed = ~excluded_slices(case.label, self.exclude_labels, exclude_mode)
            else:
                allowed = np.ones(case.n_slices, dtype=bool)
            idx = _VolumeIndex(case, reg, allowed, self.n_shot + 1, self.min_pixels)
            if idx.n_regions:
                indexes.append(idx)
        if not indexes:
            raise ValueError(
                f"no {what} spans {self.n_shot + 1} consecutive allowed slices with >= {self.min_pixels} pixels "
                f"in any of the {len(cases)} training volumes"
            )
        self.indexes = indexes

    def __len__(self) -> int:
        return self.n_episodes

    def _warp(self, transform, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple:
        """``transform(image, mask, rng, params)``, redrawn while the mask leaves the slice (kept as is after
        ``_MAX_AUG_TRIES`` tries)."""
        for _ in range(_MAX_AUG_TRIES):
            img, msk = transform(image, mask, rng, self.augment_params)
            if msk.any():
                return img, msk
        return np.asarray(image, dtype=np.float32).copy(), mask.astype(np.float32)

    def _draw_valid_window(self, rng: np.random.Generator) -> tuple:
        vol = self.indexes[int(rng.integers(len(self.indexes)))]
        k = int(rng.integers(vol.n_regions))
        starts = vol.starts[k]
        return vol, int(vol.region_ids[k]), int(starts[int(rng.integers(len(starts)))])

    def _draw_public(self, rng: np.random.Generator) -> tuple:
        window = self.n_shot + 1
        draws = 0
        while draws < _MAX_DRAWS:
            vol = self.indexes[int(rng.integers(len(self.indexes)))]
            while draws < _MAX_DRAWS:
                draws += 1
                k = int(rng.integers(len(vol.run_region_ids)))
                runs = vol.runs[k]
                if len(runs) == 0:  # no run long enough: the public code restarts with a new volume
                    break
                first, length = runs[int(rng.integers(len(runs)))]
                z0 = int(first) + int(rng.integers(int(length) - window + 1))
                region = int(vol.run_region_ids[k])
                if int(vol.counts[z0:z0 + window, region].max()) >= self.min_pixels:
                    return vol, region, z0
        raise RuntimeError(f"public sampler: no episode accepted in {_MAX_DRAWS} draws (min_pixels "
                           f"{self.min_pixels} too large for these regions?)")

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.n_episodes:
            raise IndexError(f"episode index {index} out of range [0, {self.n_episodes})")
        rng = np.random.default_rng([self.seed, index])
        vol, region, z0 = self._draw_public(rng) if self.sampler == "public" else self._draw_valid_window(rng)
        slices = list(range(z0, z0 + self.n_shot + 1))
        if rng.random() < 0.5:
            slices.reverse()
        images = [vol.image[z] for z in slices]
        masks = [(vol.regions[z] == region).astype(np.float32) for z in slices]
        if self.augment and self.augment_params.independent_coins:
            # the gamma's side and the geometry's side are drawn independently (the public code)
            sides = [range(self.n_shot) if rng.random() < 0.5 else [self.n_shot] for _ in range(2)]
            for s in sides[0]:
                images[s] = gamma_transform(images[s], rng, self.augment_params.gamma_range)
            for s in sides[1]:
                images[s], masks[s] = self._warp(geometric_transform, images[s], masks[s], rng)
        elif self.augment:
            if rng.random() < 0.5:  # augment the supports
                for s in range(self.n_shot):
                    images[s], masks[s] = self._warp(augment_pair, images[s], masks[s], rng)
            else:
                images[-1], masks[-1] = self._warp(augment_pair, images[-1], masks[-1], rng)
        if self.support_spill_px:  # drawn last, so runs without it keep their episodes
            for s in range(self.n_shot):
                masks[s] = spill_mask(masks[s], int(rng.integers(0, self.support_spill_px + 1)))
        img = np.stack(images).astype(np.float32, copy=False)
        img3 = np.ascontiguousarray(np.broadcast_to(img[:, None], (img.shape[0], 3) + img.shape[1:]))
        msk = np.stack(masks)
        return {
            "support_images": torch.from_numpy(img3[: self.n_shot]),
            "support_masks": torch.from_numpy(np.ascontiguousarray(msk[: self.n_shot])),
            "query_images": torch.from_numpy(img3[self.n_shot :]),
            "query_masks": torch.from_numpy(msk[self.n_shot :].astype(np.int64)),
            "case_id": torch.tensor(vol.case.case_id, dtype=torch.int64),
            "region_id": torch.tensor(region, dtype=torch.int64),
            "slice_indices": torch.tensor(slices, dtype=torch.int64),
        }


class SupervoxelEpisodes(_RegionEpisodes):
    """Self-supervised episodes from supervoxel pseudo-labels.

    Args:
        cases: Training volumes with ``supervoxels`` loaded (and ``label`` when ``exclude_labels`` is set).
        n_episodes: Dataset length (number of episodes, e.g. n_steps * batch size).
        n_shot: Support slices per episode (>= 1).
        exclude_labels: Setting 2: classes whose slices are excluded (empty = Setting 1).
        exclude_mode: "any" (default, docs/protocol.md "Settings") or "all" (peer behaviour).
        augment: Apply the episode augmentation.
        seed: Stream seed (>= 0); episode i depends only on (seed, i).
        min_pixels: The larger mask of a window must have at least this many pixels.
        augment_params: Augmentation ranges and profile (``transforms.AUGMENT_PROFILES``).
        sampler: ``public`` or ``valid_windows`` (module docstring).
        support_spill_px: Support masks grow by a radius drawn from 0..support_spill_px pixels
            (``transforms.spill_mask``), drawn after everything else; the query mask stays exact (0: off).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        n_episodes: int,
        n_shot: int = 1,
        exclude_labels: Sequence[int] = (),
        exclude_mode: str = "any",
        augment: bool = True,
        seed: int = 2025,
        min_pixels: int = 200,
        augment_params: AugmentParams = AUGMENT_PROFILES["public"],
        sampler: str = "public",
        support_spill_px: int = 0,
    ):
        regions = []
        for case in cases:
            if case.supervoxels is None:
                raise ValueError(f"{case.image_path}: supervoxels not loaded (pass n_sv when loading)")
            regions.append(compact_labels(case.supervoxels))
        super().__init__(
            cases, regions, n_episodes, n_shot, exclude_labels, exclude_mode, augment, seed, min_pixels,
            augment_params, "supervoxel", sampler, support_spill_px,
        )


class GroundTruthEpisodes(_RegionEpisodes):
    """Supervised episodes from ground-truth labels with the test classes removed (``use_gt``).

    Args:
        cases: Training volumes with ``label`` loaded.
        n_episodes: Dataset length.
        test_labels: Classes never used as episode targets (set to background).
        n_shot, exclude_labels, exclude_mode, augment, seed, min_pixels, augment_params, sampler,
            support_spill_px: As in ``SupervoxelEpisodes``.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        n_episodes: int,
        test_labels: Sequence[int],
        n_shot: int = 1,
        exclude_labels: Sequence[int] = (),
        exclude_mode: str = "any",
        augment: bool = True,
        seed: int = 2025,
        min_pixels: int = 200,
        augment_params: AugmentParams = AUGMENT_PROFILES["public"],
        sampler: str = "public",
        support_spill_px: int = 0,
    ):
        test = np.asarray(sorted(int(c) for c in test_labels), dtype=np.int64)
        regions = []
        for case in cases:
            if case.label is None:
                raise ValueError(f"{case.image_path}: ground-truth episodes need the label volume, not loaded")
            reg = case.label.astype(np.uint8, copy=True)
            if test.size:
                reg[np.isin(reg, test)] = 0
            regions.append(reg)
        self.test_labels = tuple(int(c) for c in test)
        super().__init__(
            cases, regions, n_episodes, n_shot, exclude_labels, exclude_mode, augment, seed, min_pixels,
            augment_params, "training class", sampler, support_spill_px,
        )


def build_training_cases(
    data_dir: Union[str, Path],
    spec: DatasetSpec,
    eval_fold: int,
    n_sv: Optional[int],
    use_gt: bool,
    load_label: Optional[bool] = None,
    num_workers: int = 0,
    sv_dir: Optional[Union[str, Path]] = None,
    volumes: Optional[Sequence[int]] = None,
) -> list:
    """Load the training volumes of a fold (all volumes not in the evaluation fold).

    Args:
        data_dir: Data set folder.
        spec: Data set facts.
        eval_fold: EP1 fold held out for evaluation.
        n_sv: Supervoxel folder (``supervoxels_<n_sv>``); None uses ``spec.n_sv``; ignored when ``use_gt``.
        use_gt: Load labels instead of supervoxels (supervised episodes).
        load_label: Also load labels in self-supervised mode (needed for Setting 2). Default: True.
        num_workers: Processes used to read the files (0: this process).
        sv_dir: Folder of the ``superpix-MIDDLE_<id>.nii.gz`` files (default ``data_dir/supervoxels_<n_sv>``).
        volumes: Explicit volume ids (default: the folder, checked against the registry's public ids).

    Returns:
        List of ``Case``; supervoxels are stored in the smallest unsigned dtype holding them (uint8 for a
        few hundred supervoxels), to keep a fold of 256x256 volumes in little memory.
    """
    train_ids, _ = fold_volume_ids(data_dir, spec, eval_fold, volumes)
    if use_gt:
        sv = None
        lab = True
    else:
        sv = spec.n_sv if n_sv is None else int(n_sv)
        lab = True if load_label is None else bool(load_label)
    return load_cases(data_dir, train_ids, spec, n_sv=sv, load_label=lab, num_workers=num_workers, sv_dir=sv_dir,
                      compact=True)


def build_training_episodes(
    cases: Sequence[Case],
    n_episodes: int,
    use_gt: bool,
    test_labels: Sequence[int],
    exclude_labels: Sequence[int] = (),
    exclude_mode: str = "any",
    n_shot: int = 1,
    augment: bool = True,
    seed: int = 2025,
    min_pixels: int = 200,
    sampler: str = "public",
    augment_profile: str = "public",
    support_spill_px: int = 0,
) -> _RegionEpisodes:
    """Episode dataset for a training run.

    Args:
        cases: From ``build_training_cases``.
        n_episodes: Dataset length.
        use_gt: Supervised (ground-truth) episodes instead of supervoxel episodes.
        test_labels: Test classes (removed from ground-truth episodes).
        exclude_labels: Classes whose slices are left out (Setting 2: the test classes; Setting 1: none).
        exclude_mode, n_shot, augment, seed, min_pixels, sampler: See ``SupervoxelEpisodes``.
        augment_profile: ``public`` or ``compact`` (``dataloaders.transforms``).
        support_spill_px: each support mask grows by a radius drawn uniformly from 0..support_spill_px
            pixels (``dataloaders.transforms.spill_mask``): an annotation that overshoots into the
            neighbouring tissue; the query mask stays exact (0: off).
    """
    common = dict(
        n_shot=n_shot, exclude_labels=tuple(exclude_labels), exclude_mode=exclude_mode, augment=augment,
        seed=seed, min_pixels=min_pixels, sampler=sampler, augment_params=augment_params(augment_profile),
        support_spill_px=support_spill_px,
    )
    if use_gt:
        return GroundTruthEpisodes(cases, n_episodes, tuple(test_labels), **common)
    return SupervoxelEpisodes(cases, n_episodes, **common)
