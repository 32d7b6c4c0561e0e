"""Compiled CPU kernel of the spatial-embedding loss: value and gradient in one pass (numba).

The same loss as :func:`embseg.loss.spatial_embedding_loss` (see that module's docstring for the
definition and for why background pixels below a likelihood bound can be left out of an object's
Lovasz hinge), computed image by image in loops that touch each pixel a few times instead of the
≈40 full-size tensor operators (and their backward) of the torch formulation:

1. one pass over the pixels: embeddings (from the offsets' ``tanh``, computed vectorised by the
   caller), per-object pixel counts, sigma
   sums and centre sums (the marked centre pixels, else the member mean);
2. one pass: each foreground pixel's likelihood for its own object (the seed target and the
   exact-drop bound), the seed and variance terms and their gradients;
3. the pairs of the Lovasz hinge: every object's own pixels, and the background pixels with
   ``q < limit`` found through a grid of cells over embedding space (a counting sort of the
   pixels by cell; each object tests only the pixels of the cells its box touches);
4. per object, one sort of its pairs by decreasing hinge error, the closed-form Lovasz weights,
   the hinge and its gradient with respect to the embeddings and the bandwidth;
5. one pass writing the gradient of the raw outputs (the chain rule through ``tanh``, the
   bandwidth ``exp(10 * sigma_bar)`` and the sigma means).

Arithmetic is in float64 whatever the input's dtype (the gradient is written in the input's
dtype). Images run in parallel threads (the kernel releases the GIL). The gradient is computed in the forward
pass and kept for the backward (one array the size of the raw outputs).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # numba is a dependency; without it the loss falls back to its torch formulation.
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["AVAILABLE", "loss_and_gradient"]

_POOLS: dict[int, ThreadPoolExecutor] = {}

#: Whether the compiled kernel can run (numba imported and not disabled by
#: ``EMBSEG_LOSS_BACKEND=torch``).
AVAILABLE = numba is not None and os.environ.get("EMBSEG_LOSS_BACKEND", "").lower() != "torch"

#: Up to this many objects in an image, the background pairs are found by testing every
#: pixel against every object (sequential, in pixel order); above it through a grid of cells.
_DENSE_MAX_OBJECTS = 16
#: Status codes written per image by the kernel.
_OK, _BAD_LABEL = 0, 1


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
def _descending_order(errors: np.ndarray) -> np.ndarray:
    """Permutation sorting ``errors`` (float64, ``>= 0``) in decreasing order.

    Long rows: an LSD radix sort (11-bit digits) of the float32 roundings' bit patterns (those
    of non-negative floats order as the values), then runs of equal roundings put in exact
    order by insertion; short rows: a comparison sort.
    """
    m = errors.shape[0]
    if m < 256:
        return np.argsort(-errors)
    keys = errors.astype(np.float32).view(np.uint32)
    order = np.arange(m)
    spare = np.empty(m, np.int64)
    count = np.empty(2049, np.int64)
    for shift in (0, 11, 22):
        count[:] = 0
        for i in range(m):
            count[2047 - ((keys[i] >> shift) & 2047) + 1] += 1
        if count.max() == m:  # every key has this digit: nothing to do
            continue
        for c in range(2048):
            count[c + 1] += count[c]
        for i in range(m):
            j = order[i]
            digit = 2047 - ((keys[j] >> shift) & 2047)
            spare[count[digit]] = j
            count[digit] += 1
        order, spare = spare, order
    # Exact order inside runs of equal float32 keys (short: roundings of nearly equal errors).
    i = 0
    while i < m:
        run_end = i + 1
        while run_end < m and keys[order[run_end]] == keys[order[i]]:
            run_end += 1
        if run_end - i > 16:  # e.g. members with phi ~ 0: errors just below 2
            run = order[i:run_end].copy()
            order[i:run_end] = run[np.argsort(-errors[run])]
        else:
            for a in range(i + 1, run_end):
                j = order[a]
                b = a - 1
                while b >= i and errors[order[b]] < errors[j]:
                    order[b + 1] = order[b]
                    b -= 1
                order[b + 1] = j
        i = run_end
    return order


@_jit()
def _select_dense(emb, labels, present, centre, s, limit):
    """Background pairs ``(pixel, phi)`` with ``q < limit``, every pixel tested against every
    present object; grouped by object (``start``), each group in pixel order."""
    n, ndim = emb.shape
    n_present = present.shape[0]
    start = np.zeros(n_present + 1, np.int64)
    pixel = np.empty(max(n, 16), np.int64)
    phi = np.empty(max(n, 16))
    found = np.empty(n, np.int64)  # one object's hits (at most every pixel)
    found_q = np.empty(n)
    a = 0
    for i in range(n_present):
        k = present[i]
        start[i] = a
        c = centre[k]
        w = s[k]
        bound = limit[k]
        hits = 0
        for p in range(n):
            q = 0.0
            for d in range(ndim):
                diff = emb[p, d] - c[d]
                q += w[d] * diff * diff
            if q < bound and labels[p] != k:
                found[hits] = p
                found_q[hits] = q
                hits += 1
        pixel = _grow(pixel, a + hits)
        phi = _grow(phi, a + hits)
        for j in range(hits):
            pixel[a + j] = found[j]
            phi[a + j] = math.exp(-found_q[j])
        a += hits
    start[n_present] = a
    return start, pixel, phi


@_jit()
def _select_grid(emb, labels, present, centre, s, limit, half, e_lo, e_hi):
    """:func:`_select_dense` through a grid of cells over embedding space: the pixels are
    counting-sorted by cell, and each object tests only the pixels of the cells its box
    (``|e_d - C_d| < half_d``, implied by ``q < limit``) touches; groups in cell order."""
    n, ndim = emb.shape
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
        c = np.median(widths[:m]) / 2.0 if m > 0 else span
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
            i = int((emb[p, d] - e_lo[d]) / cell[d])
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
            emb_by_cell[j, d] = emb[p, d]
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
    ndim = shape.shape[0]
    n = labels.shape[0]
    slots = n_ids + 1

    # -- 1. embeddings and per-object sums ---------------------------------------------------
    emb = np.empty((n, ndim))  # pixel-major: one pixel's embedding is one cache line
    counts = np.zeros(slots, np.int64)
    sigma_sum = np.zeros((slots, ndim))
    mark_sum = np.zeros((slots, ndim))
    mark_count = np.zeros(slots, np.int64)
    member_sum = np.zeros((slots, ndim))
    e_lo = np.full(ndim, np.inf)
    e_hi = np.full(ndim, -np.inf)
    index = np.zeros(ndim, np.int64)
    coord = np.zeros(ndim)
    for p in range(n):
        label = labels[p]
        if label < 0 or label > n_ids:
            return _BAD_LABEL
        mark = marks[p]
        if mark > n_ids or mark < 0:
            mark = 0  # a centre id beyond the label range belongs to no object
        for d in range(ndim):
            coord[d] = index[d] * step[d]
            e = tanh_offsets[d, p] + coord[d]
            emb[p, d] = e
            e_lo[d] = min(e_lo[d], e)
            e_hi[d] = max(e_hi[d], e)
        if label > 0:
            counts[label] += 1
            for d in range(ndim):
                sigma_sum[label, d] += raw[ndim + d, p]
                member_sum[label, d] += coord[d]
        if mark > 0:
            mark_count[mark] += 1
            for d in range(ndim):
                mark_sum[mark, d] += coord[d]
        # Next multi-index (C order).
        d = ndim - 1
        index[d] += 1
        while d > 0 and index[d] == shape[d]:
            index[d] = 0
            d -= 1
            index[d] += 1

    n_objects = 0
    sigma_bar = np.zeros((slots, ndim))
    s = np.zeros((slots, ndim))
    centre = np.zeros((slots, ndim))
    for k in range(1, slots):
        if counts[k] == 0:
            continue
        n_objects += 1
        for d in range(ndim):
            sigma_bar[k, d] = sigma_sum[k, d] / counts[k]
            s[k, d] = math.exp(10.0 * sigma_bar[k, d])
            if mark_count[k] > 0:
                centre[k, d] = mark_sum[k, d] / mark_count[k]
            else:
                centre[k, d] = member_sum[k, d] / counts[k]
    per_object = 1.0 / max(n_objects, 1)

    # -- 2. own likelihoods, seed and variance terms --------------------------------------------
    own_phi = np.zeros(n)
    best = np.zeros(slots)
    var_sum = np.zeros(slots)
    seed_sum = 0.0
    seed_scale = w_seed * scale / n
    var_scale = np.zeros(slots)
    for k in range(1, slots):
        if counts[k] > 0:
            var_scale[k] = 2.0 * w_var * scale * per_object / (counts[k] * ndim)
    for p in range(n):
        label = labels[p]
        seed = 1.0 / (1.0 + math.exp(-raw[2 * ndim, p]))
        if label > 0:
            q = 0.0
            for d in range(ndim):
                diff = emb[p, d] - centre[label, d]
                q += s[label, d] * diff * diff
            phi = math.exp(-q)
            own_phi[p] = phi
            best[label] = max(best[label], phi)
            r = seed - phi
            seed_sum += fg_weight * r * r
            g_seed = 2.0 * fg_weight * r
            sq = 0.0
            for d in range(ndim):
                dv = raw[ndim + d, p] - sigma_bar[label, d]
                sq += dv * dv
                if need_grad:
                    grad[ndim + d, p] = var_scale[label] * dv
            var_sum[label] += sq
        else:
            seed_sum += seed * seed
            g_seed = 2.0 * seed
            if need_grad:
                for d in range(ndim):
                    grad[ndim + d, p] = 0.0
        if need_grad:
            grad[2 * ndim, p] = seed_scale * g_seed * seed * (1.0 - seed)

    # Background pixels with q >= limit have Lovasz weight 0 or phi below the cutoff.
    limit = np.full(slots, -np.inf)
    half = np.zeros((slots, ndim))
    for k in range(1, slots):
        if counts[k] == 0:
            continue
        keep = max((1.0 - best[k]) * (1.0 - 1e-3) - 4.0 * eps, max(phi_cutoff, 0.0))
        limit[k] = -math.log(keep) + 1e-4 if keep > 0 else np.inf
        for d in range(ndim):
            half[k, d] = math.sqrt(limit[k] / s[k, d]) * (1.0 + 1e-5) if keep > 0 else np.inf

    # -- 3. pairs: each object's members, and the background pixels with q < limit -------------
    present = np.empty(n_objects, np.int64)
    i = 0
    for k in range(1, slots):
        if counts[k] > 0:
            present[i] = k
            i += 1
    if n_objects <= _DENSE_MAX_OBJECTS:
        bg_start, bg_pixel, bg_phi = _select_dense(emb, labels, present, centre, s, limit)
    else:
        bg_start, bg_pixel, bg_phi = _select_grid(emb, labels, present, centre, s, limit, half, e_lo, e_hi)
    # Members grouped by object, in pixel order (counting sort by label).
    member_start = np.zeros(slots + 1, np.int64)
    for k in range(1, slots):
        member_start[k + 1] = member_start[k] + counts[k]
    fill = member_start[:-1].copy()
    members = np.empty(max(member_start[slots], 1), np.int64)
    for p in range(n):
        label = labels[p]
        if label > 0:
            members[fill[label]] = p
            fill[label] += 1

    # -- 4. Lovasz hinge per object and its gradient ------------------------------------------
    grad_emb = np.zeros((n, ndim))
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
            phi[j] = own_phi[pixel[j]]
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
        # d hinge / d q = -phi * weight * d error / d phi (relu'(0) = 0), in pair order.
        for a in range(m):
            if errors[a] > 0.0:
                dq = phi[a] * weights[a] * (2.0 if a < size else -2.0) * hinge_scale
                p = pixel[a]
                for d in range(ndim):
                    diff = emb[p, d] - centre[k, d]
                    grad_emb[p, d] += 2.0 * dq * s[k, d] * diff
                    grad_s[k, d] += dq * diff * diff

    var_total = 0.0
    for k in range(1, slots):
        if counts[k] > 0:
            var_total += var_sum[k] / (counts[k] * ndim)
    terms[0] = inst_sum * per_object
    terms[1] = var_total * per_object
    terms[2] = seed_sum / n

    # -- 5. gradient of the raw outputs ---------------------------------------------------------
    if need_grad:
        # d s / d sigma_bar = 10 s; d sigma_bar / d sigma = 1 / count on the object's pixels.
        grad_sigma_bar = np.zeros((slots, ndim))
        for k in range(1, slots):
            if counts[k] > 0:
                for d in range(ndim):
                    grad_sigma_bar[k, d] = 10.0 * s[k, d] * grad_s[k, d] / counts[k]
        for p in range(n):
            label = labels[p]
            for d in range(ndim):
                t = tanh_offsets[d, p]
                grad[d, p] = grad_emb[p, d] * (1.0 - t * t)
                if label > 0:
                    grad[ndim + d, p] += grad_sigma_bar[label, d]
    return _OK


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="embseg-loss")
    return _POOLS[workers]


def loss_and_gradient(
    raw: np.ndarray,
    tanh_offsets: np.ndarray,
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
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-image loss terms and the gradient of the batch loss with respect to ``raw``.

    Parameters
    ----------
    raw
        ``(B, 2D + 1, N)`` float32 or float64 raw outputs, C-contiguous (``N`` = pixels per crop).
    tanh_offsets
        ``(B, D, N)`` ``tanh`` of the offset channels, C-contiguous (computed by the caller with
        a vectorised ``tanh``: a scalar one costs more than the rest of the first pass).
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
    terms
        ``(B, 3)`` float64 per-image instance, variance and seed terms (unweighted).
    grad
        ``(B, 2D + 1, N)`` gradient of ``mean_b(w_inst * inst_b + w_var * var_b + w_seed * seed_b)``
        in ``raw``'s dtype, or None when ``need_grad`` is False.

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
        status[b] = _image_loss(raw[b], tanh_offsets[b], labels[b], marks[b], shape_a, step_a, *args, grad[b], terms[b])

    workers = min(batch, max(1, n_threads or 1))
    if workers > 1:  # the kernel releases the GIL: images run in parallel threads
        list(_pool(workers).map(one, range(batch)))
    else:
        for b in range(batch):
            one(b)
    bad = np.flatnonzero(status == _BAD_LABEL)
    if bad.size:
        raise ValueError(f"instance ids of image {int(bad[0])} are negative or above max_label={n_ids}")
    return terms, (grad if need_grad else None)
