"""Compiled greedy clustering (numba): the loop of :func:`embseg.cluster.greedy_labels`.

A pixel can only be in the proposal of a seed if its embedding lies in the seed's ``phi = 0.5``
ellipse, whose semi-axes are ``sqrt(ln 2 / s_d)``; so it lies in the box around that ellipse.
The candidates are sorted once into a grid of cells over embedding space (a counting sort, their
embeddings copied in cell order); each seed tests exactly only the candidates of the cells its
box touches, which along the last axis are one contiguous run of the sorted copy. The exact
test is the one of the NumPy formulation: ``exp(-sum_d s_d (e_d - c_d) ** 2) > 0.5``, the sum
taken axis by axis in the same order, in float64, and ``exp`` evaluated only where the exponent
is within ``1e-12`` (relative) of ``ln 2`` (elsewhere the comparison is decided by the exponent
alone). Visiting the seeds, accepting a proposal (``min_size``, more than half unclustered) and
labelling are as in the module :mod:`embseg.cluster`.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit

from embseg.embedding import PHI_THRESHOLD

__all__ = ["gather", "greedy_labels_kernel", "grid_shape", "warm_up", "warm_up_in_background"]

#: ``phi > PHI_THRESHOLD`` iff the exponent is below this (ln 2), up to the rounding of ``exp``.
_MAX_EXPONENT = -math.log(PHI_THRESHOLD)
#: Exponents below / above these are inside / outside without evaluating ``exp``.
_INSIDE_BELOW = _MAX_EXPONENT * (1.0 - 1e-12)
_OUTSIDE_ABOVE = _MAX_EXPONENT * (1.0 + 1e-12)
#: The box of a seed is widened by this relative margin of its semi-axes and this fraction of
#: a cell, so that rounding can never leave out a pixel that the exact test keeps.
_REL_MARGIN = 1e-7
_CELL_MARGIN = 1e-6
#: The grid has at most this many cells per candidate (plus a constant).
_CELLS_PER_POINT = 2


def grid_shape(
    emb: np.ndarray, semi_axes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Origin, cell width and cell count per axis of the grid for candidates and seeds.

    Parameters
    ----------
    emb
        ``(D, N)`` float64 embeddings of the candidates.
    semi_axes
        ``(S, D)`` float64 semi-axes of the seeds' ``phi = 0.5`` ellipses.

    Returns
    -------
    lo, width : numpy.ndarray
        ``(D,)`` float64 origin and cell width (embedding units).
    dims : numpy.ndarray
        ``(D,)`` int64 cells per axis; at most :data:`_CELLS_PER_POINT` cells per candidate.
    """
    ndim, n = emb.shape
    lo, hi = _bounds(emb)
    if not np.all(lo <= hi):  # an axis without a finite embedding: every candidate in one bin
        return np.zeros(ndim), np.ones(ndim), np.ones(ndim, dtype=np.int64)
    extent = hi - lo
    # Half the typical semi-axis: a box then spans about five cells per axis.
    typical = np.full(ndim, np.nan)
    for d in range(ndim):
        a = semi_axes[:, d]
        a = a[np.isfinite(a) & (a > 0)]
        if a.size:
            typical[d] = 0.5 * float(np.median(a))
    fallback = extent / max(1.0, 0.5 * n ** (1.0 / ndim))
    width = np.where(np.isfinite(typical), typical, fallback)
    width = np.where(width > 0, width, np.where(extent > 0, extent, 1.0))
    dims = np.floor(extent / width).astype(np.int64) + 1
    cap = _CELLS_PER_POINT * n + 1024
    while float(np.prod(dims.astype(np.float64))) > cap:
        width = width * 1.5
        dims = np.floor(extent / width).astype(np.int64) + 1
    return lo, width, dims


@njit(cache=True, nogil=True, error_model="numpy")
def _bounds(emb):  # pragma: no cover - compiled
    """Per axis the smallest and largest finite embedding (``inf`` / ``-inf`` for none)."""
    ndim, n = emb.shape
    lo = np.full(ndim, np.inf)
    hi = np.full(ndim, -np.inf)
    for d in range(ndim):
        low, high = np.inf, -np.inf
        for j in range(n):
            x = emb[d, j]
            if x - x == 0.0:  # finite
                low = min(low, x)
                high = max(high, x)
        lo[d] = low
        hi[d] = high
    return lo, hi


@njit(cache=True, nogil=True, error_model="numpy")
def gather(flat, index):  # pragma: no cover - compiled
    """``flat[c, index]`` for every row ``c`` of a ``(C, P)`` array, widened to float64."""
    out = np.empty((flat.shape[0], index.shape[0]), np.float64)
    for c in range(flat.shape[0]):
        for j in range(index.shape[0]):
            out[c, j] = flat[c, index[j]]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _sort_into_cells(emb, lo, width, dims):  # pragma: no cover - compiled
    """Counting sort of the candidates by cell (C order of cells, ascending index inside one).

    Returns ``start`` (cells + 2: the last bin holds candidates with a non-finite embedding,
    never visited), ``order`` (sorted position -> candidate) and the embeddings in that order.
    """
    ndim, n = emb.shape
    n_cells = 1
    for d in range(ndim):
        n_cells *= dims[d]
    cell = np.zeros(n, np.int64)
    bad = np.zeros(n, np.bool_)
    for d in range(ndim):
        top = dims[d] - 1
        inverse = 1.0 / width[d]
        for j in range(n):
            x = (emb[d, j] - lo[d]) * inverse
            if x - x != 0.0:  # NaN / inf: the last bin
                bad[j] = True
                c = 0
            elif x <= 0.0:
                c = 0
            elif x >= top:
                c = top
            else:
                c = int(x)
            cell[j] = cell[j] * dims[d] + c
    start = np.zeros(n_cells + 2, np.int64)
    for j in range(n):
        if bad[j]:
            cell[j] = n_cells
        start[cell[j] + 1] += 1
    for c in range(n_cells + 1):
        start[c + 1] += start[c]
    cursor = start[:-1].copy()
    order = np.empty(n, np.int64)
    sorted_emb = np.empty((ndim, n), np.float64)
    for j in range(n):
        p = cursor[cell[j]]
        cursor[cell[j]] += 1
        order[p] = j
        for d in range(ndim):
            sorted_emb[d, p] = emb[d, j]
    return start, order, sorted_emb


@njit(cache=True, nogil=True, error_model="numpy")
def _greedy(
    emb, bw, seeds, lo, width, dims, min_size, labels, accepted, rel_margin, cell_margin, inside_below, outside_above
):  # pragma: no cover - compiled
    """The greedy loop over ``seeds`` (candidate indices in visiting order, bandwidths ``bw``
    ``(S, D)``); writes ``labels`` ``(N,)`` and the accepted seeds' positions in ``seeds`` into
    ``accepted``; returns how many were accepted."""
    ndim, n = emb.shape
    start, order, sorted_emb = _sort_into_cells(emb, lo, width, dims)
    position = np.empty(n, np.int64)
    for p in range(n):
        position[order[p]] = p
    clustered = np.zeros(n, np.bool_)
    sorted_labels = np.zeros(n, np.uint32)
    proposal = np.empty(n, np.int64)
    centre = np.empty(ndim, np.float64)
    b = np.empty(ndim, np.float64)
    first = np.empty(ndim, np.int64)
    last = np.empty(ndim, np.int64)
    index = np.empty(ndim, np.int64)
    next_label = 1
    n_accepted = 0
    for i in range(seeds.shape[0]):
        k = position[seeds[i]]
        if clustered[k]:
            continue
        m = 0
        n_free = 0
        valid = True
        for d in range(ndim):
            centre[d] = sorted_emb[d, k]
            b[d] = bw[i, d]
            a = math.sqrt(_MAX_EXPONENT / b[d]) * (1.0 + rel_margin) + cell_margin * width[d]
            inverse = 1.0 / width[d]
            x0 = (centre[d] - a - lo[d]) * inverse
            x1 = (centre[d] + a - lo[d]) * inverse
            if not (x0 == x0) or not (x1 == x1):  # NaN bandwidth or embedding: nothing is inside
                valid = False
                break
            # Cells are clamped as the candidates were (a box beyond the grid still scans the
            # border cells, whose candidates the exact test rejects).
            first[d] = 0 if x0 <= 0 else (dims[d] - 1 if x0 >= dims[d] - 1 else int(x0))
            last[d] = 0 if x1 <= 0 else (dims[d] - 1 if x1 >= dims[d] - 1 else int(x1))
            index[d] = first[d]
        if valid:
            tail = ndim - 1
            while True:
                base = 0
                for d in range(tail):
                    base = base * dims[d] + index[d]
                base = base * dims[tail]
                for p in range(start[base + first[tail]], start[base + last[tail] + 1]):
                    e = 0.0
                    for d in range(ndim):
                        diff = sorted_emb[d, p] - centre[d]
                        t = b[d] * diff
                        t *= diff
                        e += t
                    if e < inside_below:
                        inside = True
                    elif e > outside_above:
                        inside = False
                    else:
                        inside = math.exp(-e) > PHI_THRESHOLD
                    if inside:
                        proposal[m] = p
                        m += 1
                        if not clustered[p]:
                            n_free += 1
                d = tail - 1
                while d >= 0:
                    index[d] += 1
                    if index[d] <= last[d]:
                        break
                    index[d] = first[d]
                    d -= 1
                if d < 0:
                    break
        if m >= min_size and 2 * n_free > m:
            for q in range(m):
                sorted_labels[proposal[q]] = next_label
            next_label += 1
            accepted[n_accepted] = i
            n_accepted += 1
        for q in range(m):
            clustered[proposal[q]] = True
        clustered[k] = True
    for p in range(n):
        labels[order[p]] = sorted_labels[p]
    return n_accepted


def greedy_labels_kernel(
    emb: np.ndarray, s_seeds: np.ndarray, seeds: np.ndarray, min_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the candidates by the greedy loop over ``seeds``.

    Parameters
    ----------
    emb
        ``(N, D)`` float64 embeddings of the candidates (any layout; the columns of a ``(D, N)``
        array are used without a copy).
    s_seeds
        ``(S, D)`` float64 bandwidths of the seeds.
    seeds
        ``(S,)`` candidate indices of the seeds in visiting order.
    min_size
        Smallest accepted proposal.

    Returns
    -------
    labels : numpy.ndarray
        ``(N,)`` uint32, 0 = unassigned, objects 1, 2, ... in acceptance order.
    accepted : numpy.ndarray
        ``(L,)`` int64 candidate index of the seed of label ``k + 1``.
    """
    columns = np.ascontiguousarray(np.asarray(emb, dtype=np.float64).T)
    bw = np.ascontiguousarray(s_seeds, dtype=np.float64)
    seeds = np.ascontiguousarray(seeds, dtype=np.int64)
    n = columns.shape[1]
    labels = np.zeros(n, dtype=np.uint32)
    with np.errstate(divide="ignore", invalid="ignore"):
        semi_axes = np.sqrt(_MAX_EXPONENT / bw)
    lo, width, dims = grid_shape(columns, semi_axes)
    accepted = np.empty(seeds.shape[0], dtype=np.int64)
    count = _greedy(columns, bw, seeds, lo, width, dims, int(min_size), labels, accepted,
                    _REL_MARGIN, _CELL_MARGIN, _INSIDE_BELOW, _OUTSIDE_ABOVE)
    return labels, seeds[accepted[:count]]


def warm_up() -> None:
    """Compile the kernels (≈5 s, once per install: numba caches them next to this module or in
    its user cache) or load them from the cache (≈0.5 s), on a tiny 2D and 3D input."""
    for ndim in (2, 3):
        emb = np.linspace(0.0, 1.0, 8 * ndim).reshape(8, ndim)
        greedy_labels_kernel(emb, np.full((2, ndim), 4.0), np.array([0, 5]), 1)
    flat = np.zeros((2, 8), np.float32)
    gather(flat, np.arange(3, dtype=np.int64))
    gather(flat.astype(np.float64), np.arange(3, dtype=np.int64))


def warm_up_in_background() -> threading.Thread:
    """:func:`warm_up` in a daemon thread (``embseg predict`` starts it while it loads the model
    and runs the network; a clustering called before it is done waits for the compilation)."""
    thread = threading.Thread(target=warm_up, name="embseg-cluster-warm-up", daemon=True)
    thread.start()
    return thread
