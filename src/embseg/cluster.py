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
(:func:`embseg.embedding.membership_radius`). The loop runs compiled
(:mod:`embseg.cluster_kernel`): the candidates are sorted once into a grid of cells over
embedding space, and each seed tests exactly only the candidates of the cells that the box
around its ellipse touches. Seeds are visited from one descending sort (of the seeds only), so
there is no arg-max per iteration, and everything runs in float64 on the CPU with no device
round trips. Only the candidates are gathered and widened to float64; the seediness map stays
float32 (thresholds are compared as in float64), and when no candidate reaches ``seed_thresh``
(an untrained or empty image) no geometry or grid is built at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from embseg.cluster_kernel import gather, greedy_labels_kernel
from embseg.embedding import bandwidth, n_output_channels, split_raw


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


def _flat_channels(raw: torch.Tensor, channels: slice) -> np.ndarray:
    """``(C, P)`` float32/float64 NumPy view (or copy) of some channels of raw outputs."""
    flat = raw.detach().cpu()[channels]
    flat = flat.reshape(flat.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return flat.numpy()


def _embeddings(
    raw: torch.Tensor, index: np.ndarray, step: Sequence[float], origin: Sequence[int] | None
) -> np.ndarray:
    """Embeddings ``(N, D)`` float64 of the pixels at flat ``index`` (columns contiguous)."""
    ndim = _ndim_of(raw)
    shape = tuple(raw.shape[1:])
    origin = [0] * ndim if origin is None else list(origin)
    # Only the candidates are gathered and widened (never a float64 copy of a whole map).
    emb = torch.tanh(torch.from_numpy(gather(_flat_channels(raw, slice(0, ndim)), index)))
    pixel = np.unravel_index(index, shape)
    for d in range(ndim):
        coordinate = (torch.from_numpy(pixel[d]).to(torch.float64) + origin[d]) * step[d]
        emb[d] += coordinate
    # (N, D) view of the (D, N) array: each axis is one contiguous column (no copies).
    return emb.numpy().T


def _bandwidths(raw: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """Bandwidths ``(N, D)`` float64 of the pixels at flat ``index`` (columns contiguous)."""
    ndim = _ndim_of(raw)
    return bandwidth(torch.from_numpy(gather(_flat_channels(raw, slice(ndim, 2 * ndim)), index))).numpy().T


def _geometry(
    raw: torch.Tensor, index: np.ndarray, step: Sequence[float], origin: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and bandwidths ``(N, D)`` float64 of the pixels at flat ``index``."""
    return _embeddings(raw, index, step, origin), _bandwidths(raw, index)


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
        Grid step per axis (used by ``max_radius`` only).
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
    seeds = np.flatnonzero(seed >= seed_thresh)
    labels, accepted = _greedy_from_seeds(emb, s[seeds], seeds, seed, step, min_size, tie_key, max_radius)
    return (labels, accepted) if return_seeds else labels


def _greedy_from_seeds(
    emb: np.ndarray,
    s_seeds: np.ndarray,
    seeds: np.ndarray,
    seed: np.ndarray,
    step: Sequence[float],
    min_size: int,
    tie_key: np.ndarray | None,
    max_radius: Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`greedy_labels` given the candidates that reach the seed threshold (``seeds``,
    ascending) and their bandwidths: only seeds need a bandwidth."""
    if max_radius is not None and seeds.size:
        keep = _within_radius(s_seeds, step, max_radius)
        seeds, s_seeds = seeds[keep], s_seeds[keep]
    # Seeds in descending seediness, ties in candidate order (a stable sort of the seeds only).
    if tie_key is None:
        order = np.argsort(-seed[seeds], kind="stable")
    else:
        order = np.lexsort((np.asarray(tie_key)[seeds], -seed[seeds]))
    if seeds.size == 0:
        return np.zeros(seed.shape[0], dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return greedy_labels_kernel(emb, s_seeds[order], seeds[order], min_size)


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
        # No pixel can start an object: no geometry, no grid.
        labels = labels.reshape(shape)
        return (labels, np.zeros(0, dtype=np.int64)) if return_seeds else labels
    seed64 = seed.astype(np.float64)
    seeds = np.flatnonzero(seed64 >= seed_thresh)
    labels[index], seeds = _greedy_from_seeds(
        _embeddings(raw, index, step, origin), _bandwidths(raw, index[seeds]), seeds, seed64, step,
        min_size, None, max_radius,
    )
    labels = labels.reshape(shape)
    if return_seeds:
        return labels, index[seeds]
    return labels
