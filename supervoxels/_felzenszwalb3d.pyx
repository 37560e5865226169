# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Cython core of the deterministic 3-D Felzenszwalb graph segmentation.

Do not call this module directly: use :func:`supervoxels.felzenszwalb.felzenszwalb_3d`, which validates
its input, converts it to C-contiguous float32 and computes the per-offset weight factors.

Graph and order (DESIGN.md section 2):

* Voxels are indexed in C (raster) order: ``v = (z * H + y) * W + x``.
* Each voxel has 13 *forward* neighbours ``(dz, dy, dx) > (0, 0, 0)`` in lexicographic order (the order
  of ``FORWARD_OFFSETS`` in :mod:`supervoxels.felzenszwalb`); together they cover the 26-neighbourhood
  once. The edge from voxel ``v`` along offset ``k`` has the id ``e = 13 * v + k`` (uint32).
* The weight of an edge is ``|I[a] - I[b]| * c[k]`` evaluated in IEEE float32, ``c[k] = sqrt(w_k)``.
* Edges are processed in ascending weight; **ties are broken by ascending edge id**. This total order
  does not depend on the platform, the compiler or the numpy version.

Sorting: a non-negative float32 orders like its bit pattern read as uint32 (its "key"). The edge ids are
bucketed by the top 16 key bits with a stable counting sort (two streaming passes over the volume that
recompute the weights instead of storing them), then each bucket is sorted by the low 16 key bits with a
stable LSD radix sort (insertion sort for small buckets) the first time a merge pass reaches it. Only the
uint32 edge ids are stored: 4 bytes per edge, no float64 weights, no pairs of 64-bit indices.

Merging: pass 1 is Felzenszwalb's rule with ``k = scale / 255``; it stops early, exactly, once the edge
weight reaches ``max(k, L + k / 2)`` (``L`` = weight of the last merge), a bound on every component's
threshold ``Int(c) + k / |c|``. Pass 2 merges across edges where either side is smaller than
``min_size``; it stops once no component is smaller than ``min_size`` (or only one is left). Both stops
change nothing in the result. Union-find uses union by size and path halving; the partition does not
depend on which root is kept, only on the merge decisions.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

cnp.import_array()

cdef enum:
    N_OFFSETS = 13
    N_BUCKETS = 32768  # top 16 bits of a key with the sign bit cleared
    INSERTION_MAX = 48

# Forward offsets (dz, dy, dx), lexicographic; must match supervoxels.felzenszwalb.FORWARD_OFFSETS.
cdef int OFF_DZ[N_OFFSETS]
cdef int OFF_DY[N_OFFSETS]
cdef int OFF_DX[N_OFFSETS]
OFF_DZ[:] = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
OFF_DY[:] = [0, 1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1]
OFF_DX[:] = [1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1]


cdef union FloatBits:
    float f
    uint32_t u


cdef inline uint32_t edge_key(const float* vol, Py_ssize_t a, Py_ssize_t b, float c) noexcept nogil:
    """Bits of the float32 weight |vol[a] - vol[b]| * c (non-negative, so they sort like the weight)."""
    cdef FloatBits d
    d.f = vol[a] - vol[b]
    d.u = d.u & 0x7fffffffU  # |d|, also maps -0.0 to +0.0
    d.f = d.f * c
    return d.u


cdef inline float key_to_float(uint32_t key) noexcept nogil:
    cdef FloatBits d
    d.u = key
    return d.f


cdef inline int32_t find_root(int32_t* parent, int32_t x) noexcept nogil:
    """Root of x with path halving."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


cdef struct EdgeCtx:
    const float* vol
    Py_ssize_t off[N_OFFSETS]
    float c[N_OFFSETS]


cdef inline uint32_t id_key(const EdgeCtx* ctx, uint32_t e) noexcept nogil:
    cdef uint32_t a = e // N_OFFSETS
    cdef uint32_t k = e - a * N_OFFSETS
    return edge_key(ctx.vol, a, <Py_ssize_t>a + ctx.off[k], ctx.c[k])


cdef struct SortBuffers:
    uint16_t* ka
    uint16_t* kb
    uint32_t* itmp
    Py_ssize_t capacity


cdef int ensure_capacity(SortBuffers* buf, Py_ssize_t n) noexcept nogil:
    """Grow the scratch buffers to hold n entries; 0 on success, -1 when out of memory."""
    if n <= buf.capacity:
        return 0
    free(buf.ka)
    free(buf.kb)
    free(buf.itmp)
    buf.ka = <uint16_t*>malloc(n * sizeof(uint16_t))
    buf.kb = <uint16_t*>malloc(n * sizeof(uint16_t))
    buf.itmp = <uint32_t*>malloc(n * sizeof(uint32_t))
    if buf.ka == NULL or buf.kb == NULL or buf.itmp == NULL:
        buf.capacity = 0
        return -1
    buf.capacity = n
    return 0


cdef int sort_bucket(uint32_t* ids, Py_ssize_t n, const EdgeCtx* ctx, SortBuffers* buf) noexcept nogil:
    """Stable sort of one bucket (ids ascending on entry) by the low 16 bits of the key.

    Returns 0 on success, -1 when out of memory.
    """
    cdef Py_ssize_t i, j
    cdef uint16_t first, key16, byte
    cdef uint32_t eid
    cdef Py_ssize_t count_lo[257]
    cdef Py_ssize_t count_hi[257]
    cdef bint same = True
    if n < 2:
        return 0
    # Cheap scan first: a bucket of equal keys (very common: exact ties) is already in order.
    first = <uint16_t>(id_key(ctx, ids[0]) & 0xffffU)
    for i in range(1, n):
        if <uint16_t>(id_key(ctx, ids[i]) & 0xffffU) != first:
            same = False
            break
    if same:
        return 0
    if ensure_capacity(buf, n) != 0:
        return -1
    for i in range(n):
        buf.ka[i] = <uint16_t>(id_key(ctx, ids[i]) & 0xffffU)
    if n <= INSERTION_MAX:
        for i in range(1, n):
            key16 = buf.ka[i]
            eid = ids[i]
            j = i - 1
            while j >= 0 and buf.ka[j] > key16:
                buf.ka[j + 1] = buf.ka[j]
                ids[j + 1] = ids[j]
                j -= 1
            buf.ka[j + 1] = key16
            ids[j + 1] = eid
        return 0
    # LSD radix sort, two stable counting passes of 8 bits: (ka, ids) -> (kb, itmp) -> ids.
    for i in range(257):
        count_lo[i] = 0
        count_hi[i] = 0
    for i in range(n):
        count_lo[(buf.ka[i] & 0xff) + 1] += 1
        count_hi[(buf.ka[i] >> 8) + 1] += 1
    for i in range(256):
        count_lo[i + 1] += count_lo[i]
        count_hi[i + 1] += count_hi[i]
    for i in range(n):
        byte = buf.ka[i] & 0xff
        j = count_lo[byte]
        count_lo[byte] = j + 1
        buf.kb[j] = buf.ka[i]
        buf.itmp[j] = ids[i]
    for i in range(n):
        byte = buf.kb[i] >> 8
        j = count_hi[byte]
        count_hi[byte] = j + 1
        ids[j] = buf.itmp[i]
    return 0


def count_edges(Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx):
    """Number of edges of the 26-connected grid of shape (nz, ny, nx) (each counted once)."""
    cdef int64_t total = 0
    cdef int k
    for k in range(N_OFFSETS):
        total += (<int64_t>max(nz - OFF_DZ[k], 0) * max(ny - abs(OFF_DY[k]), 0)
                  * max(nx - abs(OFF_DX[k]), 0))
    return total


def segment(cnp.ndarray[cnp.float32_t, ndim=3, mode="c"] volume not None,
            cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] factors not None,
            double scale, Py_ssize_t min_size):
    """Felzenszwalb segmentation of a float32 volume on the 26-connected grid.

    Args:
        volume: float32 [Z, H, W], C-contiguous, finite.
        factors: float32 [13], ``sqrt(w_k)`` per forward offset, positive.
        scale: Felzenszwalb scale; the merge constant is ``k = scale / 255``.
        min_size: minimum component size in voxels, >= 1.

    Returns:
        tuple ``(labels, n_labels)``: int32 [Z, H, W] labels 0..n_labels-1 numbered by first
        appearance in raster order, and the number of labels.
    """
    cdef Py_ssize_t nz = volume.shape[0], ny = volume.shape[1], nx = volume.shape[2]
    cdef Py_ssize_t n_vox = nz * ny * nx
    cdef int64_t n_edges = count_edges(nz, ny, nx)
    if n_vox <= 0:
        raise ValueError("volume is empty")
    if <int64_t>n_vox * N_OFFSETS >= (<int64_t>1 << 32):
        raise ValueError(f"volume of {n_vox} voxels is too large (at most {(1 << 32) // 13 - 1})")
    if factors.shape[0] != N_OFFSETS:
        raise ValueError("factors must have 13 entries")

    cdef EdgeCtx ctx
    cdef int k
    ctx.vol = <const float*>volume.data
    for k in range(N_OFFSETS):
        ctx.off[k] = (OFF_DZ[k] * ny + OFF_DY[k]) * nx + OFF_DX[k]
        ctx.c[k] = factors[k]

    starts_arr = np.zeros(N_BUCKETS + 1, dtype=np.int64)
    ids_arr = np.empty(max(n_edges, 1), dtype=np.uint32)
    parent_arr = np.arange(n_vox, dtype=np.int32)
    size_arr = np.ones(n_vox, dtype=np.int32)
    inner_arr = np.zeros(n_vox, dtype=np.float32)
    labels_arr = np.empty((nz, ny, nx), dtype=np.int32)
    sorted_arr = np.zeros(N_BUCKETS, dtype=np.uint8)

    cdef int64_t* starts = <int64_t*>cnp.PyArray_DATA(starts_arr)
    cdef uint32_t* ids = <uint32_t*>cnp.PyArray_DATA(ids_arr)
    cdef int32_t* parent = <int32_t*>cnp.PyArray_DATA(parent_arr)
    cdef int32_t* size = <int32_t*>cnp.PyArray_DATA(size_arr)
    cdef float* inner = <float*>cnp.PyArray_DATA(inner_arr)
    cdef int32_t* labels = <int32_t*>cnp.PyArray_DATA(labels_arr)
    cdef unsigned char* is_sorted = <unsigned char*>cnp.PyArray_DATA(sorted_arr)

    cdef SortBuffers buf
    buf.ka = NULL
    buf.kb = NULL
    buf.itmp = NULL
    buf.capacity = 0

    cdef double kk = scale / 255.0
    cdef double bound, thr_a, thr_b, w
    cdef double last_merge = -1.0
    cdef Py_ssize_t z, y, x, a, bkt, i, start, stop, small, n_comp
    cdef int64_t pos
    cdef uint32_t e, va, vk, vb, key
    cdef int32_t ra, rb, tmp, next_label
    cdef bint row_ok[N_OFFSETS]
    cdef int status = 0
    cdef bint done

    try:
        with nogil:
            # ---- counting sort by the top 16 key bits (stable: ids emitted in ascending order) ----
            for z in range(nz):
                for y in range(ny):
                    for k in range(N_OFFSETS):
                        row_ok[k] = (z + OFF_DZ[k] < nz) and (0 <= y + OFF_DY[k] < ny)
                    a = (z * ny + y) * nx
                    for x in range(nx):
                        for k in range(N_OFFSETS):
                            if row_ok[k] and 0 <= x + OFF_DX[k] < nx:
                                key = edge_key(ctx.vol, a + x, a + x + ctx.off[k], ctx.c[k])
                                starts[(key >> 16) + 1] += 1
            for bkt in range(N_BUCKETS):
                starts[bkt + 1] += starts[bkt]
            # starts[b] is now the first slot of bucket b; use starts[b] as the write cursor and
            # shift back afterwards.
            for z in range(nz):
                for y in range(ny):
                    for k in range(N_OFFSETS):
                        row_ok[k] = (z + OFF_DZ[k] < nz) and (0 <= y + OFF_DY[k] < ny)
                    a = (z * ny + y) * nx
                    for x in range(nx):
                        for k in range(N_OFFSETS):
                            if row_ok[k] and 0 <= x + OFF_DX[k] < nx:
                                key = edge_key(ctx.vol, a + x, a + x + ctx.off[k], ctx.c[k])
                                bkt = key >> 16
                                pos = starts[bkt]
                                starts[bkt] = pos + 1
                                ids[pos] = <uint32_t>((a + x) * N_OFFSETS + k)
            for bkt in range(N_BUCKETS, 0, -1):
                starts[bkt] = starts[bkt - 1]
            starts[0] = 0

            # ---- pass 1: Felzenszwalb merge rule ----
            bound = kk
            done = False
            for bkt in range(N_BUCKETS):
                start = starts[bkt]
                stop = starts[bkt + 1]
                if stop == start:
                    continue
                if not is_sorted[bkt]:
                    if sort_bucket(ids + start, stop - start, &ctx, &buf) != 0:
                        status = -1
                        break
                    is_sorted[bkt] = 1
                for i in range(start, stop):
                    e = ids[i]
                    va = e // N_OFFSETS
                    vk = e - va * N_OFFSETS
                    vb = <uint32_t>(<Py_ssize_t>va + ctx.off[vk])
                    w = key_to_float(edge_key(ctx.vol, va, vb, ctx.c[vk]))
                    if w >= bound:
                        done = True
                        break
                    ra = find_root(parent, va)
                    rb = find_root(parent, vb)
                    if ra == rb:
                        continue
                    thr_a = <double>inner[ra] + kk / <double>size[ra]
                    thr_b = <double>inner[rb] + kk / <double>size[rb]
                    if w < (thr_a if thr_a < thr_b else thr_b):
                        if size[ra] < size[rb]:
                            tmp = ra
                            ra = rb
                            rb = tmp
                        parent[rb] = ra
                        size[ra] += size[rb]
                        inner[ra] = <float>w
                        last_merge = w
                        bound = last_merge + kk / 2.0
                        if bound < kk:
                            bound = kk
                if done:
                    break

            # ---- pass 2: absorb components smaller than min_size ----
            if status == 0:
                small = 0
                n_comp = 0
                for a in range(n_vox):
                    if parent[a] == a:
                        n_comp += 1
                        if size[a] < min_size:
                            small += 1
                if small > 0 and n_comp > 1:
                    done = False
                    for bkt in range(N_BUCKETS):
                        start = starts[bkt]
                        stop = starts[bkt + 1]
                        if stop == start:
                            continue
                        if not is_sorted[bkt]:
                            if sort_bucket(ids + start, stop - start, &ctx, &buf) != 0:
                                status = -1
                                break
                            is_sorted[bkt] = 1
                        for i in range(start, stop):
                            e = ids[i]
                            va = e // N_OFFSETS
                            vk = e - va * N_OFFSETS
                            ra = find_root(parent, va)
                            rb = find_root(parent, <int32_t>(<Py_ssize_t>va + ctx.off[vk]))
                            if ra == rb:
                                continue
                            if size[ra] < min_size or size[rb] < min_size:
                                small -= (size[ra] < min_size) + (size[rb] < min_size)
                                if size[ra] < size[rb]:
                                    tmp = ra
                                    ra = rb
                                    rb = tmp
                                parent[rb] = ra
                                size[ra] += size[rb]
                                n_comp -= 1
                                small += size[ra] < min_size
                                if small == 0 or n_comp == 1:
                                    done = True
                                    break
                        if done:
                            break

            # ---- relabel 0..N-1 by first appearance in raster order ----
            if status == 0:
                for a in range(n_vox):
                    size[a] = -1
                next_label = 0
                for a in range(n_vox):
                    ra = find_root(parent, a)
                    if size[ra] < 0:
                        size[ra] = next_label
                        next_label += 1
                    labels[a] = size[ra]
    finally:
        free(buf.ka)
        free(buf.kb)
        free(buf.itmp)
    if status != 0:
        raise MemoryError("out of memory while sorting supervoxel graph edges")
    return labels_arr, int(next_label)
