"""Tests of the 3-D Felzenszwalb supervoxel engine (supervoxels.felzenszwalb)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from supervoxels.felzenszwalb import FORWARD_OFFSETS, edge_factors, felzenszwalb_3d

# ----------------------------------------------------------------------------------------------------
# Plain reference: pure Python union-find over an explicit, fully sorted edge list.
# ----------------------------------------------------------------------------------------------------


def reference_felzenszwalb(volume: np.ndarray, spacing, scale: float = 1.0, min_size: int = 1) -> np.ndarray:
    """Obviously-correct 3-D Felzenszwalb with the documented tie order (weight, then 13 * voxel + k)."""
    vol = np.asarray(volume, dtype=np.float32)
    nz, ny, nx = vol.shape
    sz, sy, sx = (float(v) for v in spacing)
    s = sz / ((sy + sx) / 2.0)
    offsets = [(dz, dy, dx) for dz in (0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) > (0, 0, 0)]
    factors = []
    for dz, dy, dx in offsets:
        steps = abs(dy) + abs(dx)
        w = 1.0 if dz == 0 else (s * s if steps == 0 else ((1 + s * s) / 2 if steps == 1 else (2 + s * s) / 3))
        factors.append(np.float32(math.sqrt(w)))
    flat = vol.ravel()
    edges = []  # (weight as float32, edge id, a, b)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                a = (z * ny + y) * nx + x
                for k, (dz, dy, dx) in enumerate(offsets):
                    z2, y2, x2 = z + dz, y + dy, x + dx
                    if 0 <= z2 < nz and 0 <= y2 < ny and 0 <= x2 < nx:
                        b = (z2 * ny + y2) * nx + x2
                        diff = np.abs(np.float32(flat[a] - flat[b]))
                        weight = np.float32(diff * factors[k])
                        edges.append((float(weight), 13 * a + k, a, b))
    edges.sort(key=lambda item: (item[0], item[1]))

    parent = list(range(vol.size))
    size = [1] * vol.size
    internal = [0.0] * vol.size

    def find(v):
        while parent[v] != v:
            v = parent[v]
        return v

    k_const = scale / 255.0
    for weight, _, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and weight < min(internal[ra] + k_const / size[ra], internal[rb] + k_const / size[rb]):
            parent[rb] = ra
            size[ra] += size[rb]
            internal[ra] = weight
    for weight, _, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            parent[rb] = ra
            size[ra] += size[rb]
    roots = [find(v) for v in range(vol.size)]
    relabel = {}
    out = np.empty(vol.size, dtype=np.int32)
    for v, r in enumerate(roots):
        out[v] = relabel.setdefault(r, len(relabel))
    return out.reshape(vol.shape)


def quantized_volume(rng: np.random.Generator, shape, levels: int = 6) -> np.ndarray:
    """Piecewise-constant noisy volume on few grey levels (many exact ties)."""
    base = rng.integers(0, levels, size=shape).astype(np.float64) * (255.0 / max(levels - 1, 1))
    return ndimage.median_filter(base, size=2)


# ----------------------------------------------------------------------------------------------------
# Exact agreement with the reference
# ----------------------------------------------------------------------------------------------------


SPACINGS = [(1.0, 1.0, 1.0), (7.7, 1.25, 1.25), (2.5, 0.8, 1.1), (0.5, 2.0, 2.0)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_continuous(spacing, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(2, 9, size=3))
    vol = ndimage.gaussian_filter(rng.uniform(0, 255, size=shape), 1.0)
    for scale, min_size in [(1.0, 1), (1.0, 7), (300.0, 5), (5000.0, 20)]:
        expected = reference_felzenszwalb(vol, spacing, scale, min_size)
        got = felzenszwalb_3d(vol, spacing, scale=scale, min_size=min_size)
        np.testing.assert_array_equal(got, expected, err_msg=f"scale={scale} min_size={min_size}")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", [3, 4])
def test_matches_reference_with_ties(spacing, seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(2, 6)), int(rng.integers(3, 9)), int(rng.integers(3, 9)))
    vol = rng.integers(0, 4, size=shape).astype(np.float64) * 85.0  # few grey levels: many exact ties
    for scale, min_size in [(1.0, 1), (1.0, 4), (500.0, 3), (20000.0, 10)]:
        expected = reference_felzenszwalb(vol, spacing, scale, min_size)
        got = felzenszwalb_3d(vol, spacing, scale=scale, min_size=min_size)
        np.testing.assert_array_equal(got, expected, err_msg=f"scale={scale} min_size={min_size}")


def test_matches_reference_large_buckets():
    """A volume big enough that weight buckets go through the radix sort, not insertion sort."""
    rng = np.random.default_rng(11)
    vol = rng.integers(0, 50, size=(4, 14, 14)).astype(np.float64) * 0.37 + rng.uniform(0, 1e-3, (4, 14, 14))
    for scale, min_size in [(1.0, 1), (400.0, 8), (1.0, 30)]:
        expected = reference_felzenszwalb(vol, (3.0, 1.0, 1.0), scale, min_size)
        got = felzenszwalb_3d(vol, (3.0, 1.0, 1.0), scale=scale, min_size=min_size)
        np.testing.assert_array_equal(got, expected)


def test_matches_reference_one_huge_bucket():
    """> 65536 edges with distinct weights in one weight bucket: the single-pass 12-bit radix path."""
    rng = np.random.default_rng(12)
    n = 100_000
    line = np.zeros(n, dtype=np.float32)
    line[1::2] = 100.0 + rng.uniform(0, 0.005, size=n // 2).astype(np.float32)  # weights in [100, 100.03)
    vol = line.reshape(1, 1, n)
    for min_size in (3, 7):
        expected = reference_felzenszwalb(vol, (1.0, 1.0, 1.0), 1.0, min_size)
        np.testing.assert_array_equal(felzenszwalb_3d(vol, (1.0, 1.0, 1.0), min_size=min_size), expected)


def test_tie_order_is_by_edge_id():
    """Voxel 3 (value 10) ties (weight 10) between two blocks; the edge with the smaller id wins."""
    line = np.array([0, 0, 0, 10, 20, 20, 20], dtype=np.float64)
    labels = felzenszwalb_3d(line.reshape(1, 1, -1), (1, 1, 1), min_size=2)
    assert labels.ravel().tolist() == [0, 0, 0, 0, 1, 1, 1]
    # along z the same: edge (2 -> 3) has id 13 * 2 + k < 13 * 3 + k
    labels = felzenszwalb_3d(line.reshape(-1, 1, 1), (1, 1, 1), min_size=2)
    assert labels.ravel().tolist() == [0, 0, 0, 0, 1, 1, 1]
    # mirrored line: now the edge to the left block (20s) has the smaller id
    labels = felzenszwalb_3d(line[::-1].reshape(1, 1, -1), (1, 1, 1), min_size=2)
    assert labels.ravel().tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_constant_volume_one_label():
    """A constant volume: all weights tie at 0 and every edge merges."""
    vol = np.full((3, 4, 5), 17.0)
    np.testing.assert_array_equal(felzenszwalb_3d(vol, (1, 1, 1), min_size=1), np.zeros(vol.shape, np.int32))


def test_edge_factors():
    f = edge_factors((7.7, 1.25, 1.25))
    s = 7.7 / 1.25
    assert f.dtype == np.float32 and f.shape == (13,)
    expected = {0: 1.0, 1: math.sqrt((1 + s * s) / 2), 2: math.sqrt((2 + s * s) / 3)}
    for k, (dz, dy, dx) in enumerate(FORWARD_OFFSETS):
        if dz == 0:
            assert f[k] == 1.0
        elif dy == 0 and dx == 0:
            assert f[k] == np.float32(s)
        else:
            assert f[k] == np.float32(expected[abs(dy) + abs(dx)])
    assert len(set(FORWARD_OFFSETS)) == 13
    neighbours = set(FORWARD_OFFSETS) | {(-a, -b, -c) for a, b, c in FORWARD_OFFSETS}
    assert len(neighbours) == 26


def test_sigma_equals_presmoothing():
    rng = np.random.default_rng(5)
    vol = rng.uniform(0, 255, size=(5, 12, 12))
    spacing = (3.0, 1.0, 1.5)
    smooth = ndimage.gaussian_filter(vol, sigma=[2.0 / sp for sp in spacing])
    np.testing.assert_array_equal(
        felzenszwalb_3d(vol, spacing, min_size=10, sigma=2.0), felzenszwalb_3d(smooth, spacing, min_size=10)
    )


def test_input_dtypes_and_layouts_agree():
    rng = np.random.default_rng(6)
    vol = rng.integers(0, 255, size=(4, 10, 9)).astype(np.int16)
    ref = felzenszwalb_3d(vol.astype(np.float32), (2, 1, 1), min_size=5)
    np.testing.assert_array_equal(felzenszwalb_3d(vol, (2, 1, 1), min_size=5), ref)
    fortran = np.asfortranarray(vol.astype(np.float64))
    np.testing.assert_array_equal(felzenszwalb_3d(fortran, (2, 1, 1), min_size=5), ref)
    np.testing.assert_array_equal(felzenszwalb_3d(vol.tolist(), [2, 1, 1], min_size=np.int64(5)), ref)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------

STRUCT26 = np.ones((3, 3, 3), dtype=bool)


def check_properties(vol, labels, min_size):
    assert labels.dtype == np.int32 and labels.shape == vol.shape
    n = int(labels.max()) + 1
    # relabelled 0..N-1, in order of first appearance
    flat = labels.ravel()
    _, first = np.unique(flat, return_index=True)
    assert np.array_equal(np.unique(flat), np.arange(n))
    assert np.all(np.diff(first) > 0)
    for lab in range(n):
        region = labels == lab
        _, n_cc = ndimage.label(region, structure=STRUCT26)
        assert n_cc == 1, f"label {lab} has {n_cc} 26-connected components"
        if vol.size >= min_size:
            assert region.sum() >= min_size
    if vol.size < min_size:
        assert n == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 7), st.integers(1, 12), st.integers(1, 12)),
    min_size=st.integers(1, 60),
    scale=st.sampled_from([0.0, 1.0, 100.0, 2000.0]),
    spacing=st.sampled_from(SPACINGS),
    quantized=st.booleans(),
)
def test_properties_random(seed, shape, min_size, scale, spacing, quantized):
    rng = np.random.default_rng(seed)
    vol = quantized_volume(rng, shape) if quantized else rng.normal(100, 40, size=shape)
    labels = felzenszwalb_3d(vol, spacing, scale=scale, min_size=min_size)
    check_properties(vol, labels, min_size)


def test_properties_seeded_larger():
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        vol = ndimage.gaussian_filter(rng.normal(100, 40, size=(8, 40, 40)), 1.0)
        labels = felzenszwalb_3d(vol, (4.0, 1.0, 1.0), scale=50.0, min_size=200)
        check_properties(vol, labels, 200)


def test_deterministic():
    rng = np.random.default_rng(7)
    vol = quantized_volume(rng, (6, 30, 30))
    first = felzenszwalb_3d(vol, (5.0, 1.0, 1.0), min_size=50)
    for _ in range(3):
        np.testing.assert_array_equal(felzenszwalb_3d(vol.copy(), (5.0, 1.0, 1.0), min_size=50), first)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_two_blocks_two_labels(axis):
    shape = [6, 10, 12]
    vol = np.full(shape, 20.0)
    index = [slice(None)] * 3
    index[axis] = slice(shape[axis] // 2, None)
    vol[tuple(index)] = 230.0
    labels = felzenszwalb_3d(vol, (3.0, 1.0, 1.0), min_size=50)
    assert labels.max() == 1
    np.testing.assert_array_equal(labels, (vol > 100).astype(np.int32))


def test_min_size_larger_than_volume_gives_one_label():
    rng = np.random.default_rng(8)
    vol = rng.uniform(0, 255, size=(2, 3, 4))
    np.testing.assert_array_equal(felzenszwalb_3d(vol, (1, 1, 1), min_size=1000), np.zeros(vol.shape, np.int32))


def test_min_size_one_and_scale_zero_keeps_distinct_voxels():
    vol = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    labels = felzenszwalb_3d(vol, (1, 1, 1), scale=0.0, min_size=1)
    np.testing.assert_array_equal(labels.ravel(), np.arange(vol.size))


def test_single_voxel_and_flat_volumes():
    assert felzenszwalb_3d(np.zeros((1, 1, 1)), (1, 1, 1), min_size=1).tolist() == [[[0]]]
    labels = felzenszwalb_3d(np.random.default_rng(0).uniform(0, 255, (1, 1, 50)), (1, 1, 1), min_size=10)
    check_properties(np.zeros((1, 1, 50)), labels, 10)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "volume, kwargs, match",
    [
        (np.zeros((4, 4)), {}, "3-D"),
        (np.zeros((2, 4, 4, 1)), {}, "3-D"),
        (np.zeros((0, 4, 4)), {}, "empty"),
        (np.full((2, 3, 3), np.nan), {}, "NaN"),
        (np.array([[[0.0, np.inf]]]), {}, "infinite"),
        (np.full((2, 2, 2), 1e300), {}, "float32"),
        (np.zeros((2, 3, 3), dtype=bool), {}, "dtype"),
        (np.zeros((2, 3, 3), dtype=complex), {}, "dtype"),
        (np.zeros((2, 3, 3)), {"spacing": (1, 1)}, "spacing"),
        (np.zeros((2, 3, 3)), {"spacing": (1, 0, 1)}, "spacing"),
        (np.zeros((2, 3, 3)), {"spacing": (1, -1, 1)}, "spacing"),
        (np.zeros((2, 3, 3)), {"spacing": (1, float("nan"), 1)}, "spacing"),
        (np.zeros((2, 3, 3)), {"spacing": "abc"}, "spacing"),
        (np.zeros((2, 3, 3)), {"min_size": 0}, "min_size"),
        (np.zeros((2, 3, 3)), {"min_size": 2.5}, "min_size"),
        (np.zeros((2, 3, 3)), {"min_size": True}, "min_size"),
        (np.zeros((2, 3, 3)), {"scale": -1.0}, "scale"),
        (np.zeros((2, 3, 3)), {"scale": float("inf")}, "scale"),
        (np.zeros((2, 3, 3)), {"sigma": -0.5}, "sigma"),
    ],
)
def test_validation_errors(volume, kwargs, match):
    kwargs = dict(kwargs)
    spacing = kwargs.pop("spacing", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=match):
        felzenszwalb_3d(volume, spacing, **kwargs)
