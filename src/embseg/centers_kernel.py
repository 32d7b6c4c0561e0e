"""Compiled exact medoids of small objects (numba): all pairwise distances, no set-up.

For an object of ``n`` pixels the brute force costs ``n ** 2`` distances; below a few hundred
pixels that is cheaper than the FFT pass of :mod:`embseg.centers` (whose grid, transforms and
Python calls cost a fixed ≈0.5 ms per batch), and it is what most objects of a training crop,
and most objects cut by a crop border, are. One call handles every object of a label image
given a box per object: the pixels of each object are gathered from its box in C order, their
sums of distances to all others computed in float64 (the inner sum vectorised: reassociated,
which changes the sums by rounding only, ~1e-15 of them), and the medoid is the first pixel
(C order) within the tie tolerance of the smallest sum, the rule of :func:`embseg.centers.medoid`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["box_medoids"]


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _sums_of_distances(points, n, out):  # pragma: no cover - compiled
    """``out[i] = sum_j |points[:, i] - points[:, j]|`` for the first ``n`` columns of a
    ``(3, m)`` array."""
    for i in range(n):
        z, y, x = points[0, i], points[1, i], points[2, i]
        total = 0.0
        for j in range(n):
            dz = points[0, j] - z
            dy = points[1, j] - y
            dx = points[2, j] - x
            total += math.sqrt(dz * dz + dy * dy + dx * dx)
        out[i] = total


@njit(cache=True, nogil=True)
def _box_medoids(labels, ids, lo, hi, spacing, max_pixels, tie_rtol):  # pragma: no cover - compiled
    n_objects = ids.shape[0]
    out = np.full((n_objects, 3), -1, np.int64)
    coords = np.empty((max_pixels, 3), np.int64)
    points = np.empty((3, max_pixels), np.float64)
    sums = np.empty(max_pixels, np.float64)
    for k in range(n_objects):
        target = ids[k]
        n = 0
        for z in range(lo[k, 0], hi[k, 0]):
            for y in range(lo[k, 1], hi[k, 1]):
                for x in range(lo[k, 2], hi[k, 2]):
                    if labels[z, y, x] == target:
                        if n < max_pixels:
                            coords[n, 0] = z
                            coords[n, 1] = y
                            coords[n, 2] = x
                        n += 1
        if n == 0 or n > max_pixels:
            continue
        for d in range(3):  # physical units, centred on the first pixel (as centers._physical)
            for i in range(n):
                points[d, i] = (coords[i, d] - coords[0, d]) * spacing[d]
        _sums_of_distances(points, n, sums)
        best = sums[0]
        for i in range(1, n):
            best = min(best, sums[i])
        limit = best + tie_rtol * abs(best)
        for i in range(n):
            if sums[i] <= limit:
                for d in range(3):
                    out[k, d] = coords[i, d]
                break
    return out


def box_medoids(
    labels: np.ndarray,
    ids: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    spacing: np.ndarray,
    max_pixels: int,
    tie_rtol: float,
) -> np.ndarray:
    """Exact medoid of each object ``ids[k]`` of ``labels`` whose pixels, all inside the box
    ``lo[k]:hi[k]``, are at most ``max_pixels``.

    Parameters
    ----------
    labels
        2D or 3D integer label image.
    ids
        ``(K,)`` object ids.
    lo, hi
        ``(K, D)`` box corners (inclusive, exclusive) holding all pixels of each object.
    spacing
        ``(D,)`` physical pixel size.
    max_pixels
        Larger objects (and empty ones) are left to the caller.
    tie_rtol
        Sums within this relative tolerance of the smallest count as tied; the first pixel in C
        order wins.

    Returns
    -------
    numpy.ndarray
        ``(K, D)`` int64 medoid indices; rows of ``-1`` for the objects left out.
    """
    ndim = labels.ndim
    pad = 3 - ndim
    view = labels.reshape((1,) * pad + labels.shape)
    if view.dtype.kind not in "iu":
        view = view.astype(np.int64)
    lo3 = np.zeros((len(ids), 3), np.int64)
    hi3 = np.ones((len(ids), 3), np.int64)
    lo3[:, pad:] = lo
    hi3[:, pad:] = hi
    spacing3 = np.ones(3, np.float64)
    spacing3[pad:] = spacing
    ids_typed = np.asarray(ids).astype(view.dtype)
    out = _box_medoids(view, ids_typed, lo3, hi3, spacing3, int(max_pixels), float(tie_rtol))
    return out[:, pad:]
