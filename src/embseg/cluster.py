"""Greedy seed clustering of spatial embeddings into instance labels, N-D.

The algorithm (DESIGN.md, "Clustering"):

1. candidates = pixels with seediness ``> fg_thresh``;
2. repeat: take the unclustered candidate with the highest seediness; stop if it is below
   ``seed_thresh``; the proposal is every candidate (clustered or not) whose likelihood
   ``phi > 0.5`` for the seed pixel's own embedding and bandwidth;
3. accept the proposal if it has at least ``min_size`` pixels and strictly more than half of
   them are still unclustered; an accepted proposal takes the next label (1, 2, ...) on all its
   pixels, overwriting earlier labels; the proposal is marked clustered either way.

Optionally (``max_radius``, what :class:`embseg.model.Model` uses: half its training crop), a
pixel whose own bandwidth gives a ``phi = 0.5`` ellipse wider than ``max_radius`` pixels on some
axis cannot start an object (it can still join one). Such a proposal is wider than any
object the network was trained on; one stray seed of this kind (a bright image border, say)
otherwise swallows every object of the image as one.

Speed without changing the result: a pixel can only be in the proposal of a seed if its
embedding lies in the ``phi = 0.5`` ellipse, whose semi-axes are ``sqrt(ln 2 / s_d)``
(:func:`embseg.embedding.membership_radius`). The candidate embeddings are put once in a
KD-tree (two trees over the two halves of the candidates, built in two threads, when there are
many); each seed asks the tree(s) for the ball that encloses its ellipse and tests only those
pixels exactly. Seeds are visited from one descending sort (of the seeds only), so there is
no arg-max per iteration, and everything runs in float64 NumPy on the CPU with no device round
trips. Only the candidates are gathered and widened to float64; the seediness map stays
float32 (thresholds are compared as in float64), and when no candidate reaches ``seed_thresh``
(an untrained or empty image) no geometry or tree is built at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from embseg.embedding import PHI_THRESHOLD, bandwidth, n_output_channels, split_raw

# The tree is queried with a radius inflated by this relative margin, so that rounding in the
# scaled coordinates can never drop a pixel that the exact test would keep.
_RADIUS_MARGIN = 1e-7


def _ndim_of(raw: torch.Tensor) -> int:
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"raw outputs must be a torch.Tensor, got {type(raw).__name__}")
    ndim = (raw.shape[0] - 1) // 2
    if raw.dim() != ndim + 1 or raw.shape[0] != n_output_channels(ndim):
        raise ValueError(
            f"raw outputs must be (2*D+1, *spatial) with D spatial axes, got {tuple(raw.shape)}"
        )
    return ndim


def seed_map(raw: torch.Tensor) -> np.ndarray:
    """Seediness ``sigmoid(seed logit)`` of raw outputs.

    Parameters
    ----------
    raw
        Raw network outputs of one image, ``(2*D+1, *spatial)``.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``spatial``, values in ``[0, 1]``.
    """
    ndim = _ndim_of(raw)
    _, _, logit = split_raw(raw.detach(), ndim)
    return torch.sigmoid(logit.float()).cpu().numpy()


def _strictly_above(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values > threshold`` for float32 ``values`` as if compared in float64, without widening.

    NumPy compares a float32 array with a Python float in float32, which differs from the
    float64 comparison when the threshold is not a float32 value (0.6, say).
    """
    t32 = np.float32(threshold)
    if float(t32) > threshold:  # rounded up: v > threshold iff v >= t32
        return values >= t32
    return values > t32  # exact, or rounded down (no float32 lies in between)


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values >= threshold`` for float32 ``values`` as if compared in float64."""
    t32 = np.float32(threshold)
    if float(t32) < threshold:  # rounded down: v >= threshold iff v > t32
        return values > t32
    return values >= t32


def _candidates(raw: torch.Tensor, fg_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the pixels with seediness above ``fg_thresh`` and their float32 seediness."""
    seed = seed_map(raw).reshape(-1)
    index = np.flatnonzero(_strictly_above(seed, fg_thresh))
    return index, seed[index]


def _geometry(
    raw: torch.Tensor, index: np.ndarray, step: Sequence[float], origin: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and bandwidths ``(N, D)`` float64 of the pixels at flat ``index``."""
    ndim = _ndim_of(raw)
    shape = tuple(raw.shape[1:])
    origin = [0] * ndim if origin is None else list(origin)
    flat = raw.detach().cpu().reshape(raw.shape[0], -1)
    index_t = torch.from_numpy(index)
    # Only the candidates are gathered and widened (never a float64 copy of a whole map).
    values = flat[: 2 * ndim].index_select(1, index_t).double()
    pixel = np.unravel_index(index, shape)
    emb = torch.tanh(values[:ndim])
    for d in range(ndim):
        coordinate = (torch.from_numpy(pixel[d]).to(torch.float64) + origin[d]) * step[d]
        emb[d] += coordinate
    s = bandwidth(values[ndim:])
    # (N, D) views of the (D, N) arrays: each axis is one contiguous column (no copies).
    return emb.numpy().T, s.numpy().T


def candidate_geometry(
    raw: torch.Tensor,
    step: Sequence[float],
    fg_thresh: float = 0.5,
    origin: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Foreground candidates of raw outputs and their embeddings, bandwidths and seediness.

    Parameters
    ----------
    raw
        Raw outputs ``(2*D+1, *spatial)``.
    step
        Grid step per array axis.
    fg_thresh
        Candidates are the pixels with seediness strictly above this.
    origin
        Global index of the first pixel (coordinates are ``(origin + p) * step``).

    Returns
    -------
    index : numpy.ndarray
        ``(N,)`` int64 flat (C-order) indices of the candidates, ascending.
    emb : numpy.ndarray
        ``(N, D)`` float64 embeddings ``coordinate + tanh(offset)``.
    s : numpy.ndarray
        ``(N, D)`` float64 bandwidths ``exp(10 * sigma)``.
    seed : numpy.ndarray
        ``(N,)`` float64 seediness (the float32 values, widened).
    """
    ndim = _ndim_of(raw)
    if len(step) != ndim:
        raise ValueError(f"step has {len(step)} entries for {ndim} spatial axes")
    index, seed = _candidates(raw, fg_thresh)
    emb, s = _geometry(raw, index, step, origin)
    return index, emb, s, seed.astype(np.float64)


#: From this many candidates on, the search is split into two KD-trees over the two halves of
#: the candidates (consecutive in C order: two slabs), built in two threads when torch may use two.
_SPLIT_TREE_MIN = 100_000


def _build_tree(points: np.ndarray) -> cKDTree:
    # An unbalanced tree (sliding midpoint) builds ~3x faster and answers the same balls.
    return cKDTree(points, leafsize=32, balanced_tree=False, compact_nodes=False)


class _Tree(NamedTuple):
    """A KD-tree over consecutive candidates, from index ``first``, with its bounding box and the
    smallest ball radius that can cover :data:`_SCAN_FRACTION` of it (half of that fraction of
    its widest extent)."""

    tree: cKDTree
    first: int
    mins: np.ndarray
    maxes: np.ndarray
    scan_radius: float


def _tree(tree: cKDTree, first: int) -> _Tree:
    mins, maxes = np.asarray(tree.mins), np.asarray(tree.maxes)
    widest = float(np.max(maxes - mins)) if mins.size else 0.0
    return _Tree(tree, first, mins, maxes, 0.5 * _SCAN_FRACTION * widest)


def _search_trees(points: np.ndarray) -> list[_Tree]:
    """KD-trees over consecutive parts of ``points`` ``(N, D)``, each with the index of its
    first point. Two parts (built concurrently: the build releases the GIL) above
    :data:`_SPLIT_TREE_MIN` points when torch's thread count allows two threads, else one."""
    n = points.shape[0]
    if n < _SPLIT_TREE_MIN or torch.get_num_threads() < 2:
        return [_tree(_build_tree(points), 0)]
    half = n // 2
    other = _pool().submit(_build_tree, points[half:])
    first = _build_tree(points[:half])
    return [_tree(first, 0), _tree(other.result(), half)]


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One worker thread for the second tree, kept between calls (starting a thread costs
    milliseconds) and made anew in a forked child, which does not inherit the thread."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="embseg-kdtree"))
    return _POOL[1]


#: A tree whose bounding box the box around a ball covers to at least this fraction (product over
#: the axes) is taken whole instead of searched: the exact test then costs ~10 ns per point on
#: contiguous columns, against ~60 ns per point found by a search (``query_ball_point`` builds a
#: Python list). Whole trees only ever add points the exact test rejects: the proposals are the same.
_SCAN_FRACTION = 0.25


def _ball(trees: list[_Tree], centre: np.ndarray, radius: float) -> np.ndarray | None:
    """Indices of (a superset of) the points within ``radius`` of ``centre`` over the trees, in
    no particular order; ``None`` for all points. A tree whose bounding box the ball clearly
    misses is not asked (when there are several); one it mostly covers (:data:`_SCAN_FRACTION`)
    is taken whole."""
    parts = []
    whole = 0
    reach = radius * (1 + 1e-9) + 1e-300
    for t in trees:
        if len(trees) > 1 and (np.any(t.mins - centre > reach) or np.any(centre - t.maxes > reach)):
            continue
        if radius >= t.scan_radius and _covered(t, centre, radius) >= _SCAN_FRACTION:
            whole += 1
            parts.append(np.arange(t.first, t.first + t.tree.n, dtype=np.intp))
            continue
        found = np.asarray(t.tree.query_ball_point(centre, radius, return_sorted=False), dtype=np.intp)
        parts.append(found + t.first if t.first else found)
    if whole == len(trees):
        return None
    if not parts:
        return np.zeros(0, dtype=np.intp)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _covered(t: _Tree, centre: np.ndarray, radius: float) -> float:
    """Fraction of the tree's bounding box inside the box around the ball (product over axes;
    an axis of zero extent counts as covered)."""
    span = t.maxes - t.mins
    inter = np.clip(np.minimum(t.maxes, centre + radius) - np.maximum(t.mins, centre - radius), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.prod(np.where(span > 0, inter / span, 1.0)))


def _within_radius(s: np.ndarray, step: Sequence[float], max_radius: Sequence[float]) -> np.ndarray:
    """``(N,)`` bool: the ``phi = 0.5`` ellipse of bandwidths ``s`` ``(N, D)`` has semi-axes of at
    most ``max_radius`` pixels (``sqrt(ln 2 / s_d) <= max_radius_d * step_d``, i.e.
    ``s_d >= ln 2 / (max_radius_d * step_d) ** 2``; NaN bandwidths fail)."""
    if len(max_radius) != s.shape[1]:
        raise ValueError(f"max_radius has {len(max_radius)} entries for {s.shape[1]} spatial axes")
    limit = math.log(2.0) / (np.asarray(max_radius, dtype=np.float64) * np.asarray(step, dtype=np.float64)) ** 2
    return np.all(s >= limit, axis=1)


def greedy_labels(
    emb: np.ndarray,
    s: np.ndarray,
    seed: np.ndarray,
    step: Sequence[float],
    seed_thresh: float = 0.9,
    min_size: int = 10,
    return_seeds: bool = False,
    tie_key: np.ndarray | None = None,
    max_radius: Sequence[float] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Greedy clustering of candidate pixels given their embeddings, bandwidths and seediness.

    Parameters
    ----------
    emb, s
        ``(N, D)`` float64 embeddings and bandwidths of the candidates.
    seed
        ``(N,)`` seediness of the candidates. Ties are visited in candidate order.
    step
        Grid step per axis; only used to scale the search tree (any positive scale gives the
        same result, this one keeps the tree well balanced).
    seed_thresh, min_size
        See :func:`cluster`.
    return_seeds
        Also return the seed of every label.
    tie_key
        ``(N,)`` integers ordering seeds of equal seediness (default: candidate order); e.g.
        the flat pixel index when the candidates come tile by tile.
    max_radius
        See :func:`cluster`.

    Returns
    -------
    labels : numpy.ndarray
        ``(N,)`` uint32 labels of the candidates, 0 = unassigned.
    seeds : numpy.ndarray, optional
        ``(L,)`` int64 candidate index of the seed that label ``k + 1`` grew from, when
        ``return_seeds``. The seed pixel itself may carry a later label.
    """
    n = seed.shape[0]
    labels = np.zeros(n, dtype=np.uint32)
    accepted: list[int] = []
    if n == 0:
        return (labels, np.zeros(0, dtype=np.int64)) if return_seeds else labels
    # Seeds in descending seediness, ties in candidate order (a stable sort of the seeds only).
    seeds = np.flatnonzero(seed >= seed_thresh)
    if max_radius is not None and seeds.size:
        seeds = seeds[_within_radius(s[seeds], step, max_radius)]
    if tie_key is None:
        seeds = seeds[np.argsort(-seed[seeds], kind="stable")]
    else:
        seeds = seeds[np.lexsort((np.asarray(tie_key)[seeds], -seed[seeds]))]
    if seeds.size == 0:
        return (labels, np.zeros(0, dtype=np.int64)) if return_seeds else labels
    scale = 1.0 / np.asarray(step, dtype=np.float64)
    scaled = np.multiply(emb, scale, order="C")
    trees = _search_trees(scaled)
    # Radius (in scaled units) of the ball enclosing each seed's phi = 0.5 ellipse.
    radius = (
        np.max(np.sqrt(math.log(2.0) / s[seeds]) * scale, axis=1) * (1 + _RADIUS_MARGIN)
        + _RADIUS_MARGIN
    )
    ndim = emb.shape[1]
    columns = [np.ascontiguousarray(emb[:, d]) for d in range(ndim)]
    clustered = np.zeros(n, dtype=bool)
    next_label = 1
    for k, r in zip(seeds.tolist(), radius.tolist(), strict=True):
        if clustered[k]:
            continue
        near = _ball(trees, scaled[k], r)
        # sum_d s_d (e_d - e_k,d) ** 2 axis by axis on contiguous columns, the same float
        # operations in the same order as ``(s[k] * diff * diff).sum(axis=1)``.
        centre, bw = emb[k], s[k]
        exponent = None
        # An infinite bandwidth times a zero distance is NaN: phi is then not > 0.5 (quietly).
        with np.errstate(invalid="ignore"):
            for d in range(ndim):
                if near is None:  # every candidate
                    diff = columns[d] - centre[d]
                else:
                    diff = columns[d].take(near)
                    diff -= centre[d]
                term = bw[d] * diff
                term *= diff
                exponent = term if exponent is None else np.add(exponent, term, out=exponent)
        inside = np.exp(-exponent) > PHI_THRESHOLD
        proposal = np.flatnonzero(inside) if near is None else near[inside]
        n_free = proposal.size - int(np.count_nonzero(clustered[proposal]))
        if proposal.size >= min_size and 2 * n_free > proposal.size:
            labels[proposal] = next_label
            next_label += 1
            accepted.append(k)
        clustered[proposal] = True
        # phi(seed) = 1, but a non-finite bandwidth must not let the loop revisit the seed.
        clustered[k] = True
    if return_seeds:
        return labels, np.asarray(accepted, dtype=np.int64)
    return labels


def cluster(
    raw: torch.Tensor,
    step: Sequence[float],
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_size: int = 10,
    origin: Sequence[int] | None = None,
    return_seeds: bool = False,
    max_radius: Sequence[float] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Instance labels from raw outputs by greedy seed clustering (N-D).

    Parameters
    ----------
    raw
        Raw network outputs of one image, ``(2*D+1, *spatial)`` (offsets, raw sigmas, seed
        logit; see :mod:`embseg.embedding`), any device and float dtype.
    step
        Grid step per array axis, :func:`embseg.embedding.grid_step`.
    seed_thresh
        A pixel can start an object only if its seediness is at least this.
    fg_thresh
        Only pixels with seediness strictly above this are clustered (in 2D and 3D).
    min_size
        An object is accepted only if its proposal has at least this many pixels.
    origin
        Global index of the first pixel of ``raw`` (default: zeros). It shifts all
        coordinates together, so it changes nothing but float rounding.
    return_seeds
        Also return where each label's seed lies (block-wise prediction assigns an object to
        the block that holds its seed).
    max_radius
        Per axis, in pixels: a pixel whose ``phi = 0.5`` ellipse (its own bandwidth) reaches
        farther than this on some axis is not a seed (default: no limit, the method's rule).

    Returns
    -------
    labels : numpy.ndarray
        ``uint32`` labels of shape ``spatial``; 0 = background, objects numbered 1, 2, ... in
        acceptance order. An object whose pixels are all taken by later objects leaves its
        number unused.
    seeds : numpy.ndarray, optional
        ``(L,)`` int64 flat (C-order) index into ``spatial`` of the seed pixel of label
        ``k + 1``, when ``return_seeds``.

    Notes
    -----
    Computed in float64 from the (float32) raw outputs. The seed pixel counts as unclustered
    in the "more than half unclustered" test (it was unclustered when it was taken; the
    original marks it first, which differs only at exactly half).

    Examples
    --------
    >>> import torch
    >>> raw = torch.zeros(5, 4, 4)
    >>> raw[4] = 5.0  # every pixel a confident seed; offsets 0, sigma 0: s = 1, huge radius
    >>> cluster(raw, step=(1 / 1023, 1 / 1023), min_size=4).max()
    np.uint32(1)
    """
    ndim = _ndim_of(raw)
    if len(step) != ndim:
        raise ValueError(f"step has {len(step)} entries for {ndim} spatial axes")
    shape = tuple(raw.shape[1:])
    labels = np.zeros(int(np.prod(shape)), dtype=np.uint32)
    index, seed = _candidates(raw, fg_thresh)
    if not np.any(_at_least(seed, seed_thresh)):
        # No pixel can start an object: no geometry, no tree.
        labels = labels.reshape(shape)
        return (labels, np.zeros(0, dtype=np.int64)) if return_seeds else labels
    emb, s = _geometry(raw, index, step, origin)
    labels[index], seeds = greedy_labels(
        emb, s, seed.astype(np.float64), step, seed_thresh, min_size, return_seeds=True, max_radius=max_radius
    )
    labels = labels.reshape(shape)
    if return_seeds:
        return labels, index[seeds]
    return labels
