# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Cython core of the deterministic 3-D Felzenszwalb graph segmentation.

Do not call this module directly: use :func:`supervoxels.felzenszwalb.felzenszwalb_3d`, which validates
its input, converts it to C-contiguous float32 and computes the per-offset weight factors.

Graph and order (docs/protocol.md, "Supervoxels"):

* Voxels are indexed in C (raster) order: ``v = (z * H + y) * W + x``.
* Each voxel has 13 *forward* neighbours ``(dz, dy, dx) > (0, 0, 0)`` in lexicographic order (the order
  of ``FORWARD_OFFSETS`` in :mod:`supervoxels.felzenszwalb`); together they cover the 26-neighbourhood
  once. The edge from voxel ``v`` along offset ``k`` has the id ``e = 13 * v + k`` (uint32).
* The weight of an edge is ``|I[a] - I[b]| * c[k]`` evaluated in IEEE float32, ``c[k] = sqrt(w_k)``.
* Edges are processed in ascending weight; **ties are broken by ascending edge id**. This total order
  does not depend on the platform, the compiler or the numpy version.

Sorting: a non-negative float32 orders like its bit pattern read as uint32 (its "key"). The edge ids are
bucketed by the top 20 key bits (sign bit always 0, so 2**19 buckets) with a stable counting sort: two
streaming passes over the volume that recompute the weights instead of storing them. The first pass also
records whether each bucket holds a single key value (common: image intensities are often discrete), in
which case the bucket is already in (key, id) order. A bucket with several key values is sorted by its
low 12 key bits with a stable LSD radix sort (insertion sort for small buckets) the first time a merge
pass reaches it, so buckets past the end of the last pass are never sorted. Only the uint32 edge ids are
stored: 4 bytes per edge, no float64 weights, no pairs of 64-bit indices.

Merging: pass 1 is Felzenszwalb's rule with ``k = scale / 255``; it stops early, exactly, once the edge
weight reaches ``max(k, L + k / 2)`` (``L`` = weight of the last merge), an upper bound of every
component's threshold ``Int(c) + k / |c|``. Pass 2 merges across edges where either side is smaller than
``min_size``; it skips edges whose two voxels are already known to lie in components of at least
``min_size`` (components only grow; such an edge can never merge anything), removes them from a bucket
before sorting it (so most of the sorting disappears), and stops once no component is smaller than
``min_size`` (or only one is left). None of these short cuts changes the result. Union-find uses union by size and path
halving; the partition does not depend on which root is kept, only on the merge decisions.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.math cimport fabsf
from libc.stdlib cimport free, malloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cnp.import_array()

cdef enum:
    N_OFFSETS = 13
    KEY_SHIFT = 12            # keys are bucketed by key >> KEY_SHIFT ...
    N_BUCKETS = 1 << 19       # ... which is < 2**19 because the sign bit is 0
    LOW_MASK = (1 << 12) - 1  # ... and sorted inside a bucket by key & LOW_MASK
    INSERTION_MAX = 48

cdef uint32_t BUCKET_EMPTY = 0xFFFFFFFFU  # no key seen (never a key: keys are < 2**31)
cdef uint32_t BUCKET_MIXED = 0xFFFFFFFEU  # several key values: needs sorting

# Forward offsets (dz, dy, dx), lexicographic; must match supervoxels.felzenszwalb.FORWARD_OFFSETS.
cdef int OFF_DZ[N_OFFSETS]
cdef int OFF_DY[N_OFFSETS]
cdef int OFF_DX[N_OFFSETS]
OFF_DZ[:] = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
OFF_DY[:] = [0, 1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1]
OFF_DX[:] = [1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1]


cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


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
    """Root of x with path halving; ``parent[r] = -size`` for a root r (size in the same cache line)."""
    cdef int32_t p = parent[x]
    cdef int32_t g
    while p >= 0:
        g = parent[p]
        if g < 0:
            return p
        parent[x] = g
        x = g
        p = parent[x]
    return x


cdef inline int32_t link(int32_t* parent, int32_t ra, int32_t rb) noexcept nogil:
    """Union by size of the roots ra != rb; returns the new root."""
    cdef int32_t tmp
    if parent[ra] > parent[rb]:  # |ra| < |rb|
        tmp = ra
        ra = rb
        rb = tmp
    parent[ra] += parent[rb]
    parent[rb] = ra
    return ra


cdef struct EdgeCtx:
    const float* vol
    Py_ssize_t off[N_OFFSETS]
    float c[N_OFFSETS]


cdef inline void row_keys(const EdgeCtx* ctx, Py_ssize_t a, Py_ssize_t nx, const Py_ssize_t* xlo,
                          const Py_ssize_t* xhi, FloatBits* kbuf) noexcept nogil:
    """Keys of the edges of one grid row (first voxel a) into kbuf[k * nx + x] for xlo[k] <= x < xhi[k].

    Same bits as :func:`edge_key` (fabsf clears the sign bit); written as plain loops the compiler
    vectorises.
    """
    cdef int k
    cdef Py_ssize_t x
    cdef const float* p = ctx.vol + a
    cdef const float* q
    cdef float c
    cdef FloatBits* out
    for k in range(N_OFFSETS):
        q = ctx.vol + a + ctx.off[k]
        c = ctx.c[k]
        out = kbuf + k * nx
        for x in range(xlo[k], xhi[k]):
            out[x].f = fabsf(p[x] - q[x]) * c


cdef inline void row_ranges(Py_ssize_t z, Py_ssize_t y, Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx,
                            Py_ssize_t* xlo, Py_ssize_t* xhi) noexcept nogil:
    """Range of x whose edge along offset k stays inside the grid, for the row (z, y); empty if none."""
    cdef int k
    for k in range(N_OFFSETS):
        if z + OFF_DZ[k] < nz and 0 <= y + OFF_DY[k] < ny:
            xlo[k] = 1 if OFF_DX[k] < 0 else 0
            xhi[k] = nx - 1 if OFF_DX[k] > 0 else nx
        else:
            xlo[k] = 0
            xhi[k] = 0


cdef inline uint32_t decode_edge(const EdgeCtx* ctx, uint32_t e, uint32_t* a, uint32_t* b) noexcept nogil:
    """Split edge id ``e = N_OFFSETS * a + k`` into its voxels a, b (= a + offset k); returns k."""
    cdef uint32_t k
    a[0] = e // N_OFFSETS
    k = e - a[0] * N_OFFSETS
    b[0] = <uint32_t>(<Py_ssize_t>a[0] + ctx.off[k])
    return k


cdef inline uint32_t id_key(const EdgeCtx* ctx, uint32_t e) noexcept nogil:
    cdef uint32_t a, b
    cdef uint32_t k = decode_edge(ctx, e, &a, &b)
    return edge_key(ctx.vol, a, b, ctx.c[k])


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
    """Stable sort of one bucket (ids ascending on entry) by the low 12 bits of the key.

    Returns 0 on success, -1 when out of memory.
    """
    cdef Py_ssize_t i, j
    cdef uint16_t low, digit
    cdef uint32_t eid
    cdef Py_ssize_t count_lo[65]
    cdef Py_ssize_t count_hi[65]
    cdef Py_ssize_t* count_all
    if n < 2:
        return 0
    if ensure_capacity(buf, n) != 0:
        return -1
    for i in range(n):
        buf.ka[i] = <uint16_t>(id_key(ctx, ids[i]) & LOW_MASK)
    if n <= INSERTION_MAX:
        for i in range(1, n):
            low = buf.ka[i]
            eid = ids[i]
            j = i - 1
            while j >= 0 and buf.ka[j] > low:
                buf.ka[j + 1] = buf.ka[j]
                ids[j + 1] = ids[j]
                j -= 1
            buf.ka[j + 1] = low
            ids[j + 1] = eid
        return 0
    if n > 16 * (LOW_MASK + 1):
        # one stable counting pass over all 12 bits: ids -> itmp -> ids
        count_all = <Py_ssize_t*>malloc((LOW_MASK + 2) * sizeof(Py_ssize_t))
        if count_all == NULL:
            return -1
        for i in range(LOW_MASK + 2):
            count_all[i] = 0
        for i in range(n):
            count_all[buf.ka[i] + 1] += 1
        for i in range(LOW_MASK + 1):
            count_all[i + 1] += count_all[i]
        for i in range(n):
            j = count_all[buf.ka[i]]
            count_all[buf.ka[i]] = j + 1
            buf.itmp[j] = ids[i]
        for i in range(n):
            ids[i] = buf.itmp[i]
        free(count_all)
        return 0
    # LSD radix sort, two stable counting passes of 6 bits: (ka, ids) -> (kb, itmp) -> ids.
    for i in range(65):
        count_lo[i] = 0
        count_hi[i] = 0
    for i in range(n):
        count_lo[(buf.ka[i] & 63) + 1] += 1
        count_hi[(buf.ka[i] >> 6) + 1] += 1
    for i in range(64):
        count_lo[i + 1] += count_lo[i]
        count_hi[i + 1] += count_hi[i]
    for i in range(n):
        digit = buf.ka[i] & 63
        j = count_lo[digit]
        count_lo[digit] = j + 1
        buf.kb[j] = buf.ka[i]
        buf.itmp[j] = ids[i]
    for i in range(n):
        digit = buf.kb[i] >> 6
        j = count_hi[digit]
        count_hi[digit] = j + 1
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
    """Felzenszwalb segmentation of a float32 volume on the 26-connected grid (GIL released).

    Args:
        volume: float32 [Z, H, W], C-contiguous, finite.
        factors: float32 [13], ``sqrt(w_k)`` per forward offset, positive.
        scale: Felzenszwalb scale; the merge constant is ``k = scale / 255``.
        min_size: minimum component size in voxels, >= 1.

    Returns:
        tuple ``(labels, n_labels, stats)``: int32 [Z, H, W] labels 0..n_labels-1 numbered by first
        appearance in raster order, the number of labels, and a dict of diagnostics (seconds spent in
        each phase, number of edges, edges visited by each pass, buckets sorted).
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
    if min_size < 1:
        raise ValueError("min_size must be >= 1")

    cdef EdgeCtx ctx
    cdef int k
    ctx.vol = <const float*>volume.data
    for k in range(N_OFFSETS):
        ctx.off[k] = (OFF_DZ[k] * ny + OFF_DY[k]) * nx + OFF_DX[k]
        ctx.c[k] = factors[k]

    starts_arr = np.zeros(N_BUCKETS + 1, dtype=np.int64)
    state_arr = np.full(N_BUCKETS, BUCKET_EMPTY, dtype=np.uint32)
    ids_arr = np.empty(max(n_edges, 1), dtype=np.uint32)
    parent_arr = np.full(n_vox, -1, dtype=np.int32)  # every voxel a root of size 1
    inner_arr = np.zeros(n_vox, dtype=np.float32)
    big_arr = np.zeros(n_vox, dtype=np.uint8)
    labels_arr = np.empty((nz, ny, nx), dtype=np.int32)

    cdef int64_t* starts = <int64_t*>cnp.PyArray_DATA(starts_arr)
    cdef uint32_t* state = <uint32_t*>cnp.PyArray_DATA(state_arr)
    cdef uint32_t* ids = <uint32_t*>cnp.PyArray_DATA(ids_arr)
    cdef int32_t* parent = <int32_t*>cnp.PyArray_DATA(parent_arr)
    cdef float* inner = <float*>cnp.PyArray_DATA(inner_arr)
    cdef uint8_t* big = <uint8_t*>cnp.PyArray_DATA(big_arr)
    cdef int32_t* labels = <int32_t*>cnp.PyArray_DATA(labels_arr)

    cdef SortBuffers buf
    buf.ka = NULL
    buf.kb = NULL
    buf.itmp = NULL
    buf.capacity = 0

    cdef double kk = scale / 255.0
    cdef double bound, thr_a, thr_b, w
    cdef Py_ssize_t z, y, x, a, bkt, i, j, start, stop, small, n_comp
    cdef int64_t pos
    cdef uint32_t e, va, vk, vb, key, st
    cdef int32_t ra, rb, next_label = 0
    cdef int32_t neg_min = <int32_t>(-min_size if min_size < 2147483647 else -2147483647)
    cdef Py_ssize_t xlo[N_OFFSETS]
    cdef Py_ssize_t xhi[N_OFFSETS]
    cdef FloatBits* kbuf = <FloatBits*>malloc(N_OFFSETS * nx * sizeof(FloatBits))
    if kbuf == NULL:
        raise MemoryError()
    cdef int status = 0
    cdef bint done
    cdef double t0, t_bucket = 0, t_pass1 = 0, t_pass2 = 0, t_relabel = 0, t_sort = 0, ts0
    cdef int64_t seen1 = 0, seen2 = 0, n_sorted = 0, skipped2 = 0

    try:
        with nogil:
            t0 = now()
            # ---- counting sort by key >> KEY_SHIFT (stable: ids emitted in ascending order) ----
            for z in range(nz):
                for y in range(ny):
                    row_ranges(z, y, nz, ny, nx, xlo, xhi)
                    a = (z * ny + y) * nx
                    row_keys(&ctx, a, nx, xlo, xhi, kbuf)
                    for k in range(N_OFFSETS):
                        for x in range(xlo[k], xhi[k]):
                            key = kbuf[k * nx + x].u
                            bkt = key >> KEY_SHIFT
                            starts[bkt + 1] += 1
                            st = state[bkt]
                            if st != key and st != BUCKET_MIXED:
                                state[bkt] = key if st == BUCKET_EMPTY else BUCKET_MIXED
            for bkt in range(N_BUCKETS):
                starts[bkt + 1] += starts[bkt]
            # starts[b] serves as the write cursor of bucket b, shifted back afterwards.
            for z in range(nz):
                for y in range(ny):
                    row_ranges(z, y, nz, ny, nx, xlo, xhi)
                    a = (z * ny + y) * nx
                    row_keys(&ctx, a, nx, xlo, xhi, kbuf)
                    for x in range(nx):
                        for k in range(N_OFFSETS):
                            if xlo[k] <= x < xhi[k]:
                                bkt = kbuf[k * nx + x].u >> KEY_SHIFT
                                pos = starts[bkt]
                                starts[bkt] = pos + 1
                                ids[pos] = <uint32_t>((a + x) * N_OFFSETS + k)
            for bkt in range(N_BUCKETS, 0, -1):
                starts[bkt] = starts[bkt - 1]
            starts[0] = 0
            t_bucket = now() - t0
            t0 = now()

            # ---- pass 1: Felzenszwalb merge rule ----
            bound = kk
            done = False
            for bkt in range(N_BUCKETS):
                start = starts[bkt]
                stop = starts[bkt + 1]
                if stop == start:
                    continue
                if state[bkt] == BUCKET_MIXED:
                    ts0 = now()
                    if sort_bucket(ids + start, stop - start, &ctx, &buf) != 0:
                        status = -1
                        break
                    state[bkt] = 0
                    n_sorted += 1
                    t_sort += now() - ts0
                for i in range(start, stop):
                    e = ids[i]
                    vk = decode_edge(&ctx, e, &va, &vb)
                    w = key_to_float(edge_key(ctx.vol, va, vb, ctx.c[vk]))
                    if w >= bound:
                        seen1 += i - start
                        done = True
                        break
                    ra = find_root(parent, va)
                    rb = find_root(parent, vb)
                    if ra == rb:
                        continue
                    thr_a = <double>inner[ra] + kk / <double>(-parent[ra])
                    thr_b = <double>inner[rb] + kk / <double>(-parent[rb])
                    if w < (thr_a if thr_a < thr_b else thr_b):
                        ra = link(parent, ra, rb)
                        inner[ra] = <float>w
                        bound = w + kk / 2.0
                        if bound < kk:
                            bound = kk
                if done:
                    break
                seen1 += stop - start
            t_pass1 = now() - t0
            t0 = now()

            # ---- pass 2: absorb components smaller than min_size ----
            if status == 0:
                small = 0
                n_comp = 0
                for a in range(n_vox):
                    if parent[a] < 0:
                        n_comp += 1
                        if parent[a] > neg_min:
                            small += 1
                for a in range(n_vox):
                    big[a] = parent[find_root(parent, a)] <= neg_min
                if small > 0 and n_comp > 1:
                    done = False
                    for bkt in range(N_BUCKETS):
                        start = starts[bkt]
                        stop = starts[bkt + 1]
                        if stop == start:
                            continue
                        seen2 += stop - start
                        if state[bkt] == BUCKET_MIXED:
                            # Unsorted bucket: first drop (stably, in place) the edges whose two voxels
                            # are already known to lie in big components -- they can never merge, so
                            # where they would sort is irrelevant -- then sort only the rest.
                            ts0 = now()
                            j = start
                            for i in range(start, stop):
                                e = ids[i]
                                vk = decode_edge(&ctx, e, &va, &vb)
                                if big[va] and big[vb]:
                                    continue
                                ids[j] = e
                                j += 1
                            skipped2 += stop - j
                            stop = j
                            if sort_bucket(ids + start, stop - start, &ctx, &buf) != 0:
                                status = -1
                                break
                            state[bkt] = 0
                            n_sorted += 1
                            t_sort += now() - ts0
                        for i in range(start, stop):
                            e = ids[i]
                            vk = decode_edge(&ctx, e, &va, &vb)
                            # big[v]: v is known to lie in a component of >= min_size voxels (a
                            # component never shrinks); an edge between two such voxels never merges.
                            if big[va]:
                                if big[vb]:
                                    skipped2 += 1
                                    continue
                                rb = find_root(parent, vb)
                                if parent[rb] <= neg_min:
                                    big[vb] = 1
                                    continue
                                ra = find_root(parent, va)
                            else:
                                ra = find_root(parent, va)
                                if big[vb] and parent[ra] <= neg_min:
                                    big[va] = 1
                                    continue
                                rb = find_root(parent, vb)
                            if ra == rb:
                                continue
                            if parent[ra] > neg_min or parent[rb] > neg_min:
                                small -= (parent[ra] > neg_min) + (parent[rb] > neg_min)
                                ra = link(parent, ra, rb)
                                n_comp -= 1
                                if parent[ra] > neg_min:
                                    small += 1
                                else:
                                    big[va] = 1
                                    big[vb] = 1
                                if small == 0 or n_comp == 1:
                                    done = True
                                    break
                            else:
                                big[va] = 1
                                big[vb] = 1
                        if done:
                            break
            t_pass2 = now() - t0
            t0 = now()

            # ---- relabel 0..N-1 by first appearance in raster order ----
            if status == 0:
                # labels[r] of a root r doubles as its label slot: it is set before or when r is reached.
                for a in range(n_vox):
                    labels[a] = -1
                for a in range(n_vox):
                    ra = find_root(parent, a)
                    if labels[ra] < 0:
                        labels[ra] = next_label
                        next_label += 1
                    labels[a] = labels[ra]
            t_relabel = now() - t0
    finally:
        free(kbuf)
        free(buf.ka)
        free(buf.kb)
        free(buf.itmp)
    if status != 0:
        raise MemoryError("out of memory while sorting supervoxel graph edges")
    stats = {
        "n_edges": int(n_edges),
        "seconds_bucket": t_bucket,
        "seconds_pass1": t_pass1,
        "seconds_pass2": t_pass2,
        "seconds_sort": t_sort,  # lazy bucket sorting, included in the pass times
        "seconds_relabel": t_relabel,
        "edges_pass1": int(seen1),
        "edges_pass2": int(seen2),  # edges in the buckets pass 2 reached (an upper bound)
        "edges_pass2_skipped": int(skipped2),
        "buckets_sorted": int(n_sorted),
    }
    return labels_arr, int(next_label), stats
