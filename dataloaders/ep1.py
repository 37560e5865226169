"""EP1, the evaluation protocol of ADNet, Q-Net, RPT and DMAP: support slices and query chunks.

- The fold (``dataloaders.folds``) is sorted by volume id; the support is the member at position ``supp_idx``
  and the other members are the queries. :func:`support_positions` gives the positions to evaluate (every
  member when the support is rotated, to report the mean and spread over supports).
- Per test class: the query keeps only the slices whose label contains the class, cut into ``n_parts``
  equal chunks by ``np.linspace(0, n, n_parts + 1).astype(int)``; chunk k is segmented with support slice k,
  taken at fraction (2k + 1) / (2 n_parts) (1/6, 1/2, 5/6) of the support's labelled-slice list:
  ``labelled[int(fraction * len(labelled))]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dataloaders.volume_io import Case

__all__ = [
    "EP1Chunk",
    "support_positions",
    "labelled_slices",
    "support_slice_indices",
    "query_chunk_bounds",
    "chunk_plan",
    "build_test_chunks",
]


@dataclass
class EP1Chunk:
    """One support slice and the query chunk it segments.

    Attributes:
        support_image: float32 [3, H, W].
        support_mask: float32 [H, W] in {0, 1}.
        query_images: float32 [n, 3, H, W].
        query_labels: uint8 [n, H, W] in {0, 1} (binary for the test class).
        slice_indices: The n query slice indices in the query volume.
        support_slice: Index of the support slice in the support volume.
    """

    support_image: np.ndarray
    support_mask: np.ndarray
    query_images: np.ndarray
    query_labels: np.ndarray
    slice_indices: list
    support_slice: int


def support_positions(n_volumes: int, supp_idx: int, rotate: bool) -> list:
    """Positions in the sorted fold of the support volumes to evaluate, the configured one first.

    Args:
        n_volumes: Number of volumes in the fold.
        supp_idx: Position of the configured support.
        rotate: Also use every other fold member as the support, in position order.

    Raises:
        ValueError: ``supp_idx`` is not a position of the fold.
    """
    if not 0 <= supp_idx < n_volumes:
        raise ValueError(f"supp_idx is {supp_idx}; the fold has {n_volumes} volumes (0..{n_volumes - 1})")
    others = [i for i in range(n_volumes) if i != supp_idx] if rotate else []
    return [int(supp_idx)] + others


def labelled_slices(label: np.ndarray, cls: int) -> np.ndarray:
    """Indices (ascending) of the slices of ``label`` [Z, H, W] that contain class ``cls``."""
    z = label.shape[0]
    return np.flatnonzero((label == cls).reshape(z, -1).any(axis=1))


def support_slice_indices(n_labelled: int, n_parts: int = 3) -> np.ndarray:
    """Positions, in a labelled-slice list of length ``n_labelled``, of the support slices (Ouyang et al.).

    Fractions (2k + 1) / (2 n_parts); n_parts = 3 gives 1/6, 1/2, 5/6.
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    if n_labelled < 1:
        raise ValueError("the support volume has no slice with the class")
    pcts = (2 * np.arange(n_parts) + 1) / (2.0 * n_parts)
    return (pcts * n_labelled).astype(np.int64)


def query_chunk_bounds(n_kept: int, n_parts: int = 3) -> np.ndarray:
    """Chunk boundaries [n_parts + 1] over ``n_kept`` query slices: ``linspace(0, n, n_parts + 1)`` as int."""
    return np.linspace(0, n_kept, n_parts + 1).astype(np.int64)


def chunk_plan(support_slices: Sequence[int], query_slices: Sequence[int], n_parts: int = 3) -> list:
    """EP1 slice correspondence: which support slice segments which query slices.

    Args:
        support_slices: Ascending indices of the support slices holding the class.
        query_slices: Ascending indices of the query slices to segment (EP1: those holding the class; for a
            new scan: the organ's extent, given or estimated).
        n_parts: Number of support slices / query chunks.

    Returns:
        ``n_parts`` pairs (support slice index, list of query slice indices); a list may be empty when there
        are fewer query slices than parts.
    """
    sup = np.asarray(support_slices, dtype=np.int64)
    qry = np.asarray(query_slices, dtype=np.int64)
    sup_pos = support_slice_indices(len(sup), n_parts)
    bounds = query_chunk_bounds(len(qry), n_parts)
    return [(int(sup[sup_pos[k]]), [int(z) for z in qry[bounds[k] : bounds[k + 1]]]) for k in range(n_parts)]


def _three(img: np.ndarray) -> np.ndarray:
    """[..., H, W] -> float32 [..., 3, H, W]."""
    img = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(np.repeat(img[..., None, :, :], 3, axis=-3))


def build_test_chunks(
    support_case: Case, query_case: Case, label: int, n_parts: int = 3, *, n_part: Optional[int] = None
) -> list:
    """EP1 chunks for one (support volume, query volume, class).

    Args:
        support_case: Support volume with ``label`` loaded.
        query_case: Query volume with ``label`` loaded.
        label: Test class (training id).
        n_parts: Number of support slices / query chunks.
        n_part: Alias of ``n_parts`` (the config key's name); wins when given.

    Returns:
        ``n_parts`` ``EP1Chunk`` s; a chunk may hold 0 query slices when the query has fewer kept slices than
        ``n_parts``.

    Raises:
        ValueError: Labels not loaded, or the support or query volume lacks the class.
    """
    if n_part is not None:
        n_parts = int(n_part)
    for case in (support_case, query_case):
        if case.label is None:
            raise ValueError(f"{case.image_path}: test episodes need the label volume, not loaded")
    sup_sl = labelled_slices(support_case.label, label)
    if sup_sl.size == 0:
        raise ValueError(f"{support_case.image_path}: support volume has no slice with class {label}")
    qry_sl = labelled_slices(query_case.label, label)
    if qry_sl.size == 0:
        raise ValueError(f"{query_case.image_path}: query volume has no slice with class {label}")
    chunks = []
    for zs, q in chunk_plan(sup_sl, qry_sl, n_parts):
        chunks.append(
            EP1Chunk(
                support_image=_three(support_case.image[zs]),
                support_mask=(support_case.label[zs] == label).astype(np.float32),
                query_images=_three(query_case.image[q]),
                query_labels=(query_case.label[q] == label).astype(np.uint8),
                slice_indices=q,
                support_slice=zs,
            )
        )
    return chunks
