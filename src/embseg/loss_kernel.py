"""Compiled CPU kernel of the spatial-embedding loss: value and gradient in one pass (numba).

The same loss as :func:`embseg.loss.spatial_embedding_loss` (see that module's docstring for the
definition and for why background pixels below a likelihood bound can be left out of an object's
Lovasz hinge), computed image by image in loops that touch each pixel a few times instead of the
≈40 full-size tensor operators (and their backward) of the torch formulation:

1. the members grouped by object (a counting sort by label, which also checks the ids);
2. embeddings ``x + tanh(offset)``, axis by axis (``tanh`` and the seed's sigmoid come vectorised
   from the caller: scalar ones cost more than the passes that use them);
3. per object, over its members: the sigma mean, the bandwidth and the centre (the marked
   centre pixels, else the member mean), then each member's likelihood for its own object (the
   seed target and the exact-drop bound), the seed and variance terms and their gradients;
4. the pairs of the Lovasz hinge: every object's own pixels, and the background pixels with
   ``q < limit``: up to :data:`_DENSE_MAX_OBJECTS` objects, each object tests every block of
   :data:`_BLOCK` pixels whose embedding box meets its own; above, a grid of cells over
   embedding space (a counting sort of the pixels by cell; each object tests only the pixels
   of the cells its box touches);
5. per object, one sort of its pairs by decreasing hinge error, the closed-form Lovasz weights,
   the hinge and its gradient with respect to the embeddings and the bandwidth;
6. the gradient of the raw outputs (the chain rule through ``tanh``, the bandwidth
   ``exp(10 * sigma_bar)`` and the sigma means).

Loops run axis by axis over the pixels or object by object over its members, so that their
accumulators stay in registers. Arithmetic is in float64 whatever the input's dtype (the
gradient is written in the input's dtype), so the loss equals the float64 definition to
rounding. Images run in parallel threads (the kernel releases the GIL).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # numba is a dependency; without it the loss falls back to its torch formulation.
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["AVAILABLE", "loss_and_gradient", "warm_up", "warm_up_in_background"]

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}

#: Whether the compiled kernel can run (numba imported and not disabled by
#: ``EMBSEG_LOSS_BACKEND=torch``).
AVAILABLE = numba is not None and os.environ.get("EMBSEG_LOSS_BACKEND", "").lower() != "torch"

#: Up to this many objects in an image, the background pairs are found by testing every
#: pixel against every object (sequential, in pixel order); above it through a grid of cells.
_DENSE_MAX_OBJECTS = 16
#: Pixels per block of the dense selection's box test.
_BLOCK = 128
#: Status codes written per image by the kernel.
_OK, _BAD_LABEL, _NON_FINITE = 0, 1, 2


def _jit(**options):
    def wrap(function):
        if numba is None:  # pragma: no cover
            return function
        return njit(cache=True, nogil=True, **options)(function)

    return wrap


@_jit()
def _grow(a: np.ndarray, need: int) -> np.ndarray:
    """``a`` with room for ``need`` elements (doubling; the first ``len(a)`` kept)."""
    if need <= a.shape[0]:
        return a
    b = np.empty(max(need, 2 * a.shape[0]), a.dtype)
    b[: a.shape[0]] = a
    return b


@_jit()
def _insertion_sort(values: np.ndarray) -> np.ndarray:
    """``values`` sorted ascending in place (for short arrays); returns them."""
    for a in range(1, values.shape[0]):
        v = values[a]
        b = a - 1
        while b >= 0 and values[b] > v:
            values[b + 1] = values[b]
            b -= 1
        values[b + 1] = v
    return values


@_jit()
def _sort_packed(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative int64: a 31-bit key in bits 32-62, an index in bits 0-31)
    sorted ascending by key, ties by index: an LSD radix sort of the key (8-bit digits for
    short arrays, 11-bit for long ones; a digit shared by every key is skipped), insertion sort
    below 64 elements."""
    m = values.shape[0]
    if m < 64:
        return _insertion_sort(values.copy())
    width = 8 if m < 8192 else 11
    mask = (1 << width) - 1
    current = values.copy()
    spare = np.empty(m, np.int64)
    count = np.empty(mask + 2, np.int64)
    shift = 32
    while shift < 63:
        count[:] = 0
        for i in range(m):
            count[((current[i] >> shift) & mask) + 1] += 1
        if count.max() < m:
            for c in range(mask + 1):
                count[c + 1] += count[c]
            for i in range(m):
                digit = (current[i] >> shift) & mask
                spare[count[digit]] = current[i]
                count[digit] += 1
            current, spare = spare, current
        shift += width
    return current


@_jit()
def _descending_order(errors: np.ndarray) -> np.ndarray:
    """Permutation sorting ``errors`` (float64 in ``[0, 2]``) in decreasing order.

    Sorted by the float32 roundings (the bit patterns of non-negative floats order as the
    values), then each run of equal roundings by the float64 bit patterns (which, for values
    that close, differ by less than ``2 ** 31``).
    """
    m = errors.shape[0]
    bits = errors.astype(np.float32).view(np.int32)
    packed = np.empty(m, np.int64)
    for i in range(m):
        packed[i] = ((0x40000000 - np.int64(bits[i])) << 32) | i  # 2.0f - x: decreasing errors
    packed = _sort_packed(packed)
    order = np.empty(m, np.int64)
    for i in range(m):
        order[i] = packed[i] & 0xFFFFFFFF
    exact = errors.view(np.int64)
    i = 0
    while i < m:
        run_end = i + 1
        while run_end < m and (packed[run_end] >> 32) == (packed[i] >> 32):
            run_end += 1
        if run_end - i > 1:  # roundings of nearly equal errors (e.g. members with phi ~ 0)
            top = exact[order[i]]
            for a in range(i, run_end):
                top = max(top, exact[order[a]])
            run = np.empty(run_end - i, np.int64)
            for a in range(i, run_end):
                run[a - i] = ((top - exact[order[a]]) << 32) | (a - i)
            run = _sort_packed(run)
            first = order[i:run_end].copy()
            for a in range(run_end - i):
                order[i + a] = first[run[a] & 0xFFFFFFFF]
        i = run_end
    return order


@_jit()
def _median(values: np.ndarray) -> float:
    """Median of ``values`` (of at most 255 evenly spaced ones: a cell-size heuristic)."""
    stride = (values.shape[0] + 254) // 255
    sample = _insertion_sort(values[::stride].copy())
    return sample[sample.shape[0] // 2]


@_jit()
def _select_dense(emb, labels, present, centre, s, limit, half):
    """Background pairs ``(pixel, phi)`` with ``q < limit``, every pixel tested against every
    present object; grouped by object (``start``), each group in pixel order.

    The pixels go in blocks of :data:`_BLOCK` consecutive ones; a block whose embedding box
    misses the object's box (``|e_d - C_d| < half_d``, implied by ``q < limit``) is skipped,
    the others are tested in vectorisable loops.
    """
    ndim, n = emb.shape
    n_present = present.shape[0]
    n_blocks = (n + _BLOCK - 1) // _BLOCK
    block_lo = np.empty((ndim, n_blocks))
    block_hi = np.empty((ndim, n_blocks))
    for d in range(ndim):
        for b in range(n_blocks):
            lo = np.inf
            hi = -np.inf
            for p in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
                lo = min(lo, emb[d, p])
                hi = max(hi, emb[d, p])
            block_lo[d, b] = lo
            block_hi[d, b] = hi
    start = np.zeros(n_present + 1, np.int64)
    pixel = np.empty(max(n // 4, 16), np.int64)
    phi = np.empty(max(n // 4, 16))
    q = np.empty(_BLOCK)
    a = 0
    for i in range(n_present):
        k = present[i]
        start[i] = a
        c = centre[k]
        w = s[k]
        bound = limit[k]
        for b in range(n_blocks):
            miss = False
            for d in range(ndim):
                if block_hi[d, b] < c[d] - half[k, d] or block_lo[d, b] > c[d] + half[k, d]:
                    miss = True
                    break
            if miss:
                continue
            first = b * _BLOCK
            size = min(n, first + _BLOCK) - first
            q[:size] = 0.0
            for d in range(ndim):
                cd = c[d]
                wd = w[d]
                for j in range(size):
                    diff = emb[d, first + j] - cd
                    q[j] += wd * diff * diff
            pixel = _grow(pixel, a + size)
            phi = _grow(phi, a + size)
            for j in range(size):
                if q[j] < bound and labels[first + j] != k:
                    pixel[a] = first + j
                    phi[a] = q[j]  # the exponent for now
                    a += 1
        for j in range(start[i], a):
            phi[j] = math.exp(-phi[j])
    start[n_present] = a
    return start, pixel, phi


@_jit()
def _select_grid(emb, labels, present, centre, s, limit, half, e_lo, e_hi):
    """:func:`_select_dense` through a grid of cells over embedding space: the pixels are
    counting-sorted by cell, and each object tests only the pixels of the cells its box
    (``|e_d - C_d| < half_d``, implied by ``q < limit``) touches; groups in cell order."""
    ndim, n = emb.shape
    n_present = present.shape[0]
    # Cells a quarter of the median box wide, at most 2 n cells.
    cell = np.empty(ndim)
    n_cells = np.empty(ndim, np.int64)
    widths = np.empty(n_present)
    for d in range(ndim):
        span = max(e_hi[d] - e_lo[d], 0.0)
        m = 0
        for i in range(n_present):
            if math.isfinite(half[present[i], d]):
                widths[m] = half[present[i], d]
                m += 1
        c = _median(widths[:m]) / 2.0 if m > 0 else span
        cell[d] = max(c, span / 4096.0, 1e-12)
    total = 1.0
    for d in range(ndim):
        total *= int(max(e_hi[d] - e_lo[d], 0.0) / cell[d]) + 1.0
    if total > 2.0 * n:
        grow = (total / (2.0 * n)) ** (1.0 / ndim)
        for d in range(ndim):
            cell[d] *= grow
    cells_total = 1
    for d in range(ndim):
        n_cells[d] = int(max(e_hi[d] - e_lo[d], 0.0) / cell[d]) + 1
        cells_total *= n_cells[d]
    strides = np.ones(ndim, np.int64)
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * n_cells[d + 1]
    pixel_cell = np.empty(n, np.int64)
    cell_start = np.zeros(cells_total + 1, np.int64)
    for p in range(n):
        flat = 0
        for d in range(ndim):
            i = int((emb[d, p] - e_lo[d]) / cell[d])
            flat += min(max(i, 0), n_cells[d] - 1) * strides[d]
        pixel_cell[p] = flat
        cell_start[flat + 1] += 1
    for c in range(cells_total):
        cell_start[c + 1] += cell_start[c]
    # Pixels in cell order, with copies of their embeddings and labels: the scans below read
    # them sequentially.
    by_cell = np.empty(n, np.int64)
    emb_by_cell = np.empty((n, ndim))
    label_by_cell = np.empty(n, np.int64)
    cursor = cell_start[:-1].copy()
    for p in range(n):
        c = pixel_cell[p]
        j = cursor[c]
        by_cell[j] = p
        label_by_cell[j] = labels[p]
        for d in range(ndim):
            emb_by_cell[j, d] = emb[d, p]
        cursor[c] += 1

    start = np.zeros(n_present + 1, np.int64)
    pixel = np.empty(max(n, 16), np.int64)
    phi = np.empty(max(n, 16))
    a = 0
    c0 = np.zeros(ndim, np.int64)
    extent = np.zeros(ndim, np.int64)
    for i in range(n_present):
        start[i] = a
        k = present[i]
        empty = False
        for d in range(ndim):
            lo = centre[k, d] - half[k, d]
            hi = centre[k, d] + half[k, d]
            if hi < e_lo[d] or lo > e_hi[d]:
                empty = True
                break
            first = 0 if lo <= e_lo[d] else min(int((lo - e_lo[d]) / cell[d]), n_cells[d] - 1)
            last = n_cells[d] - 1 if hi >= e_hi[d] else min(int((hi - e_lo[d]) / cell[d]), n_cells[d] - 1)
            c0[d] = first
            extent[d] = last - first + 1
        if empty:
            continue
        runs = 1
        for d in range(ndim - 1):
            runs *= extent[d]
        for r in range(runs):  # one run of consecutive cells along the last axis
            base = c0[ndim - 1]
            rest = r
            for d in range(ndim - 2, -1, -1):
                base += (c0[d] + rest % extent[d]) * strides[d]
                rest //= extent[d]
            lo_pixel = cell_start[base]
            hi_pixel = cell_start[base + extent[ndim - 1]]
            pixel = _grow(pixel, a + hi_pixel - lo_pixel)
            phi = _grow(phi, a + hi_pixel - lo_pixel)
            for j in range(lo_pixel, hi_pixel):
                if label_by_cell[j] == k:
                    continue
                q = 0.0
                for d in range(ndim):
                    diff = emb_by_cell[j, d] - centre[k, d]
                    q += s[k, d] * diff * diff
                if q < limit[k]:
                    pixel[a] = by_cell[j]
                    phi[a] = math.exp(-q)
                    a += 1
    start[n_present] = a
    return start, pixel, phi


@_jit()
def _image_loss(
    raw: np.ndarray,  # (C, N) raw outputs of one image
    tanh_offsets: np.ndarray,  # (D, N) tanh of the raw offsets
    seediness: np.ndarray,  # (N,) sigmoid of the raw seed
    labels: np.ndarray,  # (N,) int64 ids
    marks: np.ndarray,  # (N,) int64 centre ids
    shape: np.ndarray,  # (D,) int64
    step: np.ndarray,  # (D,) float64
    n_ids: int,
    fg_weight: float,
    w_inst: float,
    w_var: float,
    w_seed: float,
    phi_cutoff: float,
    eps: float,
    scale: float,  # d total / d (this image's loss): 1 / batch
    need_grad: bool,
    grad: np.ndarray,  # (C, N) out
    terms: np.ndarray,  # (3,) out: instance, variance, seed
) -> int:
    # Loops run axis by axis over all pixels, or object by object over its members, so that
    # accumulators stay in registers (an accumulator indexed by label or axis inside a pixel
    # loop is a store-to-load chain per pixel).
    ndim = shape.shape[0]
    n = labels.shape[0]
    slots = n_ids + 1
    strides = np.ones(ndim, np.int64)
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]

    # -- 1. members grouped by object (counting sort by label, pixel order kept) ---------------
    counts = np.zeros(slots, np.int64)
    for p in range(n):
        label = labels[p]
        if label < 0 or label > n_ids:
            return _BAD_LABEL
        counts[label] += 1
    member_start = np.zeros(slots + 1, np.int64)
    for k in range(1, slots):
        member_start[k + 1] = member_start[k] + counts[k]
    fill = member_start.copy()
    members = np.empty(max(member_start[slots], 1), np.int64)
    for p in range(n):
        label = labels[p]
        if label > 0:
            members[fill[label]] = p
            fill[label] += 1

    # -- 2. embeddings e = x + tanh(offset), axis by axis ----------------------------------------
    emb = np.empty((ndim, n))
    e_lo = np.empty(ndim)
    e_hi = np.empty(ndim)
    for d in range(ndim):
        lo = np.inf
        hi = -np.inf
        h = step[d]
        inner = strides[d]
        extent = shape[d]
        p = 0
        for _ in range(n // (extent * inner)):
            for i in range(extent):
                x = i * h
                for _ in range(inner):
                    e = tanh_offsets[d, p] + x
                    if not math.isfinite(e):
                        return _NON_FINITE
                    emb[d, p] = e
                    lo = min(lo, e)
                    hi = max(hi, e)
                    p += 1
        e_lo[d] = lo
        e_hi[d] = hi

    # -- 3. per object: centre (marked pixels, else the member mean), sigma mean, bandwidth -----
    mark_sum = np.zeros((slots, ndim))
    mark_count = np.zeros(slots, np.int64)
    for p in range(n):
        mark = marks[p]
        if mark > 0 and mark <= n_ids:  # a centre id beyond the label range belongs to no object
            mark_count[mark] += 1
            for d in range(ndim):
                mark_sum[mark, d] += ((p // strides[d]) % shape[d]) * step[d]
    n_objects = 0
    for k in range(1, slots):
        n_objects += counts[k] > 0
    present = np.empty(n_objects, np.int64)
    sigma_bar = np.zeros((slots, ndim))
    s = np.zeros((slots, ndim))
    centre = np.zeros((slots, ndim))
    i = 0
    for k in range(1, slots):
        if counts[k] == 0:
            continue
        present[i] = k
        i += 1
        for d in range(ndim):
            sigma = 0.0
            coordinate = 0.0
            for j in range(member_start[k], member_start[k + 1]):
                p = members[j]
                sigma += raw[ndim + d, p]
                if mark_count[k] == 0:
                    coordinate += ((p // strides[d]) % shape[d]) * step[d]
            sigma_bar[k, d] = sigma / counts[k]
            s[k, d] = math.exp(10.0 * sigma_bar[k, d])
            if not math.isfinite(s[k, d]):
                return _NON_FINITE
            if mark_count[k] > 0:
                centre[k, d] = mark_sum[k, d] / mark_count[k]
            else:
                centre[k, d] = coordinate / counts[k]
    per_object = 1.0 / max(n_objects, 1)

    # -- 4. seed term: background form on every pixel, then the members' form ------------------
    seed_scale = w_seed * scale / n
    seed_sum = 0.0
    for p in range(n):
        seed = seediness[p]
        if labels[p] == 0:
            seed_sum += seed * seed
        if need_grad:
            grad[2 * ndim, p] = seed_scale * 2.0 * seed * seed * (1.0 - seed)
    if need_grad:
        for d in range(ndim):
            for p in range(n):
                grad[ndim + d, p] = 0.0
    # Own likelihoods (seed targets; the best one bounds the background pairs), seed and
    # variance terms of the members.
    own_phi = np.empty(max(member_start[slots], 1))  # by member position
    best = np.zeros(slots)
    var_sum = np.zeros(slots)
    for i in range(n_objects):
        k = present[i]
        c = centre[k]
        w = s[k]
        mean_sigma = sigma_bar[k]
        var_scale = 2.0 * w_var * scale * per_object / (counts[k] * ndim)
        top = 0.0
        squares = 0.0
        for j in range(member_start[k], member_start[k + 1]):
            p = members[j]
            q = 0.0
            for d in range(ndim):
                diff = emb[d, p] - c[d]
                q += w[d] * diff * diff
            phi = math.exp(-q)
            own_phi[j] = phi
            top = max(top, phi)
            seed = seediness[p]
            r = seed - phi
            seed_sum += fg_weight * r * r
            if need_grad:
                grad[2 * ndim, p] = seed_scale * 2.0 * fg_weight * r * seed * (1.0 - seed)
            for d in range(ndim):
                dv = raw[ndim + d, p] - mean_sigma[d]
                squares += dv * dv
                if need_grad:
                    grad[ndim + d, p] = var_scale * dv
        best[k] = top
        var_sum[k] = squares

    # Background pixels with q >= limit have Lovasz weight 0 or phi below the cutoff.
    limit = np.full(slots, -np.inf)
    half = np.zeros((slots, ndim))
    for i in range(n_objects):
        k = present[i]
        keep = max((1.0 - best[k]) * (1.0 - 1e-3) - 4.0 * eps, max(phi_cutoff, 0.0))
        limit[k] = -math.log(keep) + 1e-4 if keep > 0 else np.inf
        for d in range(ndim):
            half[k, d] = math.sqrt(limit[k] / s[k, d]) * (1.0 + 1e-5) if keep > 0 else np.inf

    # -- 5. pairs: each object's members, and the background pixels with q < limit -------------
    if n_objects <= _DENSE_MAX_OBJECTS:
        bg_start, bg_pixel, bg_phi = _select_dense(emb, labels, present, centre, s, limit, half)
    else:
        bg_start, bg_pixel, bg_phi = _select_grid(emb, labels, present, centre, s, limit, half, e_lo, e_hi)

    # -- 6. Lovasz hinge per object and its gradient ------------------------------------------
    grad_emb = np.zeros((ndim, n))
    grad_s = np.zeros((slots, ndim))
    inst_sum = 0.0
    hinge_scale = w_inst * scale * per_object
    for i in range(n_objects):
        k = present[i]
        size = counts[k]
        n_bg = bg_start[i + 1] - bg_start[i]
        m = size + n_bg
        pixel = np.empty(m, np.int64)
        phi = np.empty(m)
        errors = np.empty(m)
        for j in range(size):
            pixel[j] = members[member_start[k] + j]
            phi[j] = own_phi[member_start[k] + j]
            errors[j] = 2.0 - 2.0 * phi[j]
        for j in range(n_bg):
            pixel[size + j] = bg_pixel[bg_start[i] + j]
            phi[size + j] = bg_phi[bg_start[i] + j]
            errors[size + j] = 2.0 * phi[size + j]
        order = _descending_order(errors)
        weights = np.empty(m)
        fg_seen = 0
        bg_seen = 0
        loss = 0.0
        for j in range(m):
            a = order[j]
            if a < size:
                fg_seen += 1
                weight = 1.0 / (size + bg_seen)
            else:
                bg_seen += 1
                union = size + bg_seen
                weight = (size - fg_seen) / (union * (union - 1.0))
            weights[a] = weight
            loss += errors[a] * weight
        inst_sum += loss
        if not need_grad:
            continue
        # d hinge / d q = -phi * weight * d error / d phi (relu'(0) = 0), once per pair, then
        # axis by axis in pair order.
        dq = np.empty(m)
        for a in range(m):
            dq[a] = phi[a] * weights[a] * (2.0 if a < size else -2.0) * hinge_scale if errors[a] > 0.0 else 0.0
        c = centre[k]
        w = s[k]
        for d in range(ndim):
            acc = 0.0
            for a in range(m):
                if dq[a] != 0.0:
                    p = pixel[a]
                    diff = emb[d, p] - c[d]
                    grad_emb[d, p] += 2.0 * dq[a] * w[d] * diff
                    acc += dq[a] * diff * diff
            grad_s[k, d] = acc

    var_total = 0.0
    for i in range(n_objects):
        k = present[i]
        var_total += var_sum[k] / (counts[k] * ndim)
    terms[0] = inst_sum * per_object
    terms[1] = var_total * per_object
    terms[2] = seed_sum / n

    # -- 7. gradient of the raw outputs ---------------------------------------------------------
    if need_grad:
        for d in range(ndim):
            for p in range(n):
                t = tanh_offsets[d, p]
                grad[d, p] = grad_emb[d, p] * (1.0 - t * t)
        # d s / d sigma_bar = 10 s; d sigma_bar / d sigma = 1 / count on the object's pixels.
        for i in range(n_objects):
            k = present[i]
            for d in range(ndim):
                g = 10.0 * s[k, d] * grad_s[k, d] / counts[k]
                for j in range(member_start[k], member_start[k + 1]):
                    grad[ndim + d, members[j]] += g
    return _OK


def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads kept between calls (per process: a forked child does not inherit them)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="embseg-loss")
    return _POOLS[key]


def warm_up(dtype: type = np.float32) -> None:
    """Compile the kernel for ``dtype`` inputs, or load it from numba's on-disk cache.

    The first compilation takes ≈10-20 s on a CPU like this project's (once per install: numba
    caches it next to this module, or in its user cache); loading the cache ≈0.5 s. Runs a tiny
    batch (an image with a few objects, one with many: both selection paths).
    """
    shape = (6, 48)
    labels = np.zeros((2, 6 * 48), np.int64)
    labels[0, : 3 * 48] = np.repeat(np.arange(1, 4), 48)
    labels[1] = np.repeat(np.arange(1, _DENSE_MAX_OBJECTS + 3), 16)[: 6 * 48]
    marks = np.zeros_like(labels)
    marks[:, ::16] = labels[:, ::16]
    raw = np.zeros((2, 5, 6 * 48), dtype)
    loss_and_gradient(raw, np.zeros((2, 2, 6 * 48), dtype), np.full((2, 6 * 48), 0.5, dtype), labels, marks, shape,
                      (0.01, 0.01), int(labels.max()), 10.0, 1.0, 10.0, 1.0, 1e-12)


def warm_up_in_background(dtype: type = np.float32) -> threading.Thread | None:
    """:func:`warm_up` in a daemon thread (training starts it while it reads its data); a loss
    called before it is done waits for the compilation instead of compiling twice. None when
    the kernel is not available."""
    if not AVAILABLE:
        return None
    thread = threading.Thread(target=warm_up, args=(dtype,), name="embseg-loss-warm-up", daemon=True)
    thread.start()
    return thread


def loss_and_gradient(
    raw: np.ndarray,
    tanh_offsets: np.ndarray,
    seediness: np.ndarray,
    labels: np.ndarray,
    marks: np.ndarray,
    shape: tuple[int, ...],
    step: tuple[float, ...],
    n_ids: int,
    fg_weight: float,
    w_inst: float,
    w_var: float,
    w_seed: float,
    phi_cutoff: float,
    need_grad: bool = True,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Per-image loss terms and the gradient of the batch loss with respect to ``raw``.

    Parameters
    ----------
    raw
        ``(B, 2D + 1, N)`` float32 or float64 raw outputs, C-contiguous (``N`` = pixels per crop).
    tanh_offsets, seediness
        ``(B, D, N)`` ``tanh`` of the offset channels and ``(B, N)`` sigmoid of the seed channel,
        C-contiguous (computed by the caller with vectorised functions: scalar ones cost more
        than the passes that use them).
    labels, marks
        ``(B, N)`` int64 instance ids and centre-pixel ids (see
        :func:`embseg.loss.spatial_embedding_loss`).
    shape, step
        Crop shape and grid step per array axis.
    n_ids
        Largest instance id (or an upper bound).
    fg_weight, w_inst, w_var, w_seed, phi_cutoff
        As in :func:`embseg.loss.spatial_embedding_loss`.
    need_grad
        Whether to compute the gradient.
    n_threads
        Threads over which the images are spread (default 1).

    Returns
    -------
    tuple or None
        ``terms``: ``(B, 3)`` float64 per-image instance, variance and seed terms (unweighted);
        ``grad``: ``(B, 2D + 1, N)`` gradient of ``mean_b(w_inst * inst_b + w_var * var_b +
        w_seed * seed_b)`` in ``raw``'s dtype, or None when ``need_grad`` is False. None instead
        of the pair when an embedding or an object's bandwidth is not finite (NaN or overflowing
        outputs: the grid and box arithmetic needs finite values).

    Raises
    ------
    ValueError
        When an instance id is negative or above ``n_ids``.
    """
    if not AVAILABLE:
        raise RuntimeError("the compiled loss needs numba")
    batch = raw.shape[0]
    grad = np.empty_like(raw) if need_grad else np.empty((batch, raw.shape[1], 0), raw.dtype)
    terms = np.zeros((batch, 3))
    status = np.zeros(batch, np.int64)
    eps = float(np.finfo(raw.dtype).eps)
    shape_a, step_a = np.asarray(shape, np.int64), np.asarray(step, np.float64)
    args = (int(n_ids), float(fg_weight), float(w_inst), float(w_var), float(w_seed), float(phi_cutoff), eps,
            1.0 / batch, bool(need_grad))

    def one(b: int) -> None:
        status[b] = _image_loss(raw[b], tanh_offsets[b], seediness[b], labels[b], marks[b], shape_a, step_a, *args, grad[b], terms[b])

    workers = min(batch, max(1, n_threads or 1))
    if workers > 1:  # the kernel releases the GIL: images run in parallel threads
        list(_pool(workers).map(one, range(batch)))
    else:
        for b in range(batch):
            one(b)
    bad = np.flatnonzero(status == _BAD_LABEL)
    if bad.size:
        raise ValueError(f"instance ids of image {int(bad[0])} are negative or above max_label={n_ids}")
    if np.any(status == _NON_FINITE):
        return None
    return terms, (grad if need_grad else None)
