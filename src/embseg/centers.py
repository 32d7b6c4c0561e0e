"""Object centres: exact medoid, approximate medoid and centroid, N-D and anisotropic.

All functions take the pixel coordinates of one object as an integer array ``(n, D)`` (array-axis
order) and an optional ``spacing`` (physical size of a pixel per axis, e.g. ``(2.18, 1, 1)`` for a
ZYX stack with anisotropy 2.18); distances are Euclidean in physical units.

* :func:`medoid` -- the object pixel with the smallest sum of distances to all object pixels.
  Always a pixel of the object. Exact, in bounded memory and fast (see below).
* :func:`approximate_medoid` -- the object pixel closest to the per-axis median point.
* :func:`centroid` -- the rounded mean coordinate; may lie outside a non-convex object.

Exact medoid without an ``n x n`` matrix
----------------------------------------
Write ``f(p) = sum_q |p - q|``. Group the object pixels into cells of a regular grid; cell ``B``
holds ``m_B`` pixels with mean ``c_B``. Since the norm is convex, Jensen's inequality gives
``sum_{q in B} |p - q| >= m_B |p - c_B|``, so ``L(p) = sum_B m_B |p - c_B| <= f(p)`` for every
``p``: a lower bound that costs one distance per cell instead of one per pixel. Pixels are then
evaluated exactly (chunked sums of distances) in increasing order of ``L``; once the smallest
remaining bound exceeds the best exact sum found, no other pixel can win and the search stops.
The result is the brute-force medoid (ties within a relative ``1e-9``, i.e. floating-point ties
of symmetric pixels, go to the lowest index). Cells hold about ``sqrt(n)`` pixels, which balances
the ``n x n_cells`` bound against the exact evaluations; memory stays at a few MB for any ``n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import cdist

from embseg.errors import UserError

#: Centre methods accepted by :func:`center_of` and :func:`object_centers`.
METHODS = ("medoid", "approximate_medoid", "centroid")

#: Relative tolerance under which two sums of distances count as tied.
TIE_RTOL = 1e-9
#: Objects up to this many pixels get the chunked brute force (faster than bounding there).
_BRUTE_FORCE_MAX = 512
#: Budget (float64 values) for one block of a distance matrix: 2M values = 16 MB.
_BLOCK_VALUES = 2_000_000
#: Cells of the lower bound hold about ``_CELL_FACTOR * n ** _CELL_POWER`` pixels.
_CELL_FACTOR = 1.0
_CELL_POWER = 1.0 / 3.0
#: Number of candidates evaluated exactly per round of the bounded search.
_CANDIDATE_BATCH = 16


def _physical(coords: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """Coordinates ``(n, D)`` as float64 in physical units, centred on their first pixel."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[0] == 0:
        raise ValueError(f"coords must be a non-empty (n, D) array, got shape {coords.shape}")
    points = coords.astype(np.float64)
    # centring keeps the magnitudes small, which keeps the distance sums accurate
    points -= points[0]
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64)
        if spacing.shape != (coords.shape[1],) or not np.all(spacing > 0):
            raise UserError(
                f"spacing must have {coords.shape[1]} positive values, got {spacing.tolist()}"
            )
        points *= spacing
    return points


def sum_of_distances(points: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``sum_j |points_i - coords_j|`` for every row ``i``, in blocks of bounded memory.

    Parameters
    ----------
    points
        ``(m, D)`` float array.
    coords
        ``(n, D)`` float array.

    Returns
    -------
    numpy.ndarray
        ``(m,)`` float64.
    """
    n = len(coords)
    rows = max(1, _BLOCK_VALUES // max(n, 1))
    out = np.empty(len(points), dtype=np.float64)
    for start in range(0, len(points), rows):
        out[start : start + rows] = cdist(points[start : start + rows], coords).sum(axis=1)
    return out


def _first_minimum(values: np.ndarray, index: np.ndarray) -> int:
    """Lowest ``index`` among the entries within ``TIE_RTOL`` of the minimum of ``values``."""
    best = values.min()
    tied = values <= best + TIE_RTOL * abs(best)
    return int(index[tied].min())


def _cells(points: np.ndarray, pixel_size: np.ndarray, cell_pixels: float):
    """Group points into cubic cells holding about ``cell_pixels`` object pixels on average.

    Returns the cell of every point, the cell means ``(K, D)``, counts ``(K,)`` and radii ``(K,)``
    (largest distance of a cell's points to its mean).
    """
    n, ndim = points.shape
    low = points.min(axis=0)
    extent = points.max(axis=0) - low + pixel_size
    side = (cell_pixels * float(np.prod(extent)) / n) ** (1.0 / ndim)
    cell = np.floor((points - low) / side).astype(np.int64)
    dims = tuple(int(d) for d in cell.max(axis=0) + 1)
    _, inverse, counts = np.unique(
        np.ravel_multi_index(tuple(cell.T), dims), return_inverse=True, return_counts=True
    )
    inverse = inverse.ravel()
    means = np.stack(
        [np.bincount(inverse, weights=points[:, d]) / counts for d in range(ndim)], axis=1
    )
    radius_sq = np.zeros(len(means))
    np.maximum.at(radius_sq, inverse, ((points - means[inverse]) ** 2).sum(axis=1))
    return inverse, means, counts.astype(np.float64), np.sqrt(radius_sq)


def _jensen_bound(points: np.ndarray, means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``L(p) = sum_B m_B |p - c_B|``, a lower bound of ``f(p)`` (Jensen), for every point."""
    rows = max(1, _BLOCK_VALUES // len(means))
    bound = np.empty(len(points), dtype=np.float64)
    for start in range(0, len(points), rows):
        bound[start : start + rows] = cdist(points[start : start + rows], means) @ counts
    return bound


def _cell_level_bound(means: np.ndarray, counts: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Lower bound of ``L`` over each whole cell: ``L(c_A) - |g_A| r_A`` with ``g_A`` a
    subgradient of the convex ``L`` at the cell mean (the cell's own term contributes 0)."""
    rows = max(1, _BLOCK_VALUES // len(means))
    out = np.empty(len(means), dtype=np.float64)
    for start in range(0, len(means), rows):
        block = means[start : start + rows]
        dist = cdist(block, means)
        value = dist @ counts
        weight = np.divide(counts, dist, out=np.zeros_like(dist), where=dist > 0)
        grad = block * weight.sum(axis=1, keepdims=True) - weight @ means
        out[start : start + rows] = (
            value - np.sqrt((grad**2).sum(axis=1)) * radius[start : start + rows]
        )
    return out


def _weiszfeld(points: np.ndarray, weights: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Approximate weighted geometric median (Weiszfeld iterations from the weighted mean)."""
    estimate = weights @ points / weights.sum()
    for _ in range(iterations):
        dist = np.sqrt(((points - estimate) ** 2).sum(axis=1))
        inverse = weights / np.maximum(dist, 1e-12)
        estimate = inverse @ points / inverse.sum()
    return estimate


def medoid(coords: np.ndarray, spacing: Sequence[float] | None = None) -> int:
    """Index of the exact medoid of an object.

    The medoid is the object pixel minimising the sum of Euclidean distances (in physical units)
    to all object pixels. It is computed exactly without an ``n x n`` matrix (see the module
    docstring): a 10,000-pixel object needs a few MB and a few milliseconds.

    Parameters
    ----------
    coords
        Integer pixel coordinates ``(n, D)`` of the object.
    spacing
        Physical pixel size per axis (``D`` values); ``None`` means isotropic.

    Returns
    -------
    int
        Row of ``coords`` of the medoid; among floating-point ties the lowest row.

    Examples
    --------
    >>> coords = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [0, 9]])
    >>> medoid(coords)
    2
    """
    points = _physical(coords, spacing)
    n, ndim = points.shape
    if n <= _BRUTE_FORCE_MAX:
        return _first_minimum(sum_of_distances(points, points), np.arange(n))
    pixel_size = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    cell_of, means, counts, radius = _cells(points, pixel_size, _CELL_FACTOR * n**_CELL_POWER)
    cell_bound = _cell_level_bound(means, counts, radius)
    # first exact values: the pixels nearest to the (approximate) geometric median
    center = _weiszfeld(means, counts)
    near = np.argpartition(((points - center) ** 2).sum(axis=1), _CANDIDATE_BATCH)[
        :_CANDIDATE_BATCH
    ]
    near_sums = sum_of_distances(points[near], points)
    best = float(near_sums.min())
    # only cells whose bound does not exceed it can hold the medoid
    alive = np.flatnonzero(cell_bound <= best + TIE_RTOL * best)
    candidates = np.flatnonzero(np.isin(cell_of, alive))
    bound = _jensen_bound(points[candidates], means, counts)
    order = np.argsort(bound, kind="stable")
    candidates, bound = candidates[order], bound[order]
    evaluated_index = [near]
    evaluated_sum = [near_sums]
    for start in range(0, len(candidates), _CANDIDATE_BATCH):
        if bound[start] > best + TIE_RTOL * best:
            break
        batch = candidates[start : start + _CANDIDATE_BATCH]
        sums = sum_of_distances(points[batch], points)
        evaluated_index.append(batch)
        evaluated_sum.append(sums)
        best = min(best, float(sums.min()))
    return _first_minimum(np.concatenate(evaluated_sum), np.concatenate(evaluated_index))


def approximate_medoid(coords: np.ndarray, spacing: Sequence[float] | None = None) -> int:
    """Index of the object pixel closest (in physical units) to the per-axis median point.

    Examples
    --------
    >>> approximate_medoid(np.array([[0, 0], [0, 1], [5, 5]]))
    1
    """
    coords = np.asarray(coords)
    points = _physical(coords, spacing)
    median = np.median(points, axis=0)
    return int(np.argmin(((points - median) ** 2).sum(axis=1)))


def centroid(coords: np.ndarray) -> np.ndarray:
    """Rounded mean coordinate ``(D,)`` int64 of an object; it may lie outside the object.

    Examples
    --------
    >>> centroid(np.array([[0, 0], [0, 1], [3, 5]])).tolist()
    [1, 2]
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[0] == 0:
        raise ValueError(f"coords must be a non-empty (n, D) array, got shape {coords.shape}")
    return np.rint(coords.mean(axis=0)).astype(np.int64)


def _check_method(method: str) -> str:
    name = method.replace("-", "_").lower()
    if name not in METHODS:
        raise UserError(f"unknown centre method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def center_of(
    coords: np.ndarray, method: str = "medoid", spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Centre ``(D,)`` int64 of one object given its pixel coordinates ``(n, D)``.

    ``method`` is ``"medoid"``, ``"approximate_medoid"`` (or ``"approximate-medoid"``) or
    ``"centroid"``; only the centroid may fall outside the object.
    """
    name = _check_method(method)
    coords = np.asarray(coords)
    if name == "centroid":
        return centroid(coords)
    row = medoid(coords, spacing) if name == "medoid" else approximate_medoid(coords, spacing)
    return coords[row].astype(np.int64)


def check_labels(labels: np.ndarray) -> np.ndarray:
    """Validate an instance label image (integer, non-negative); bool becomes uint8."""
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"label images must have an integer dtype, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise UserError("label images must not contain negative ids")
    return labels


def object_slices(labels: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Ids and bounding boxes of all objects, in one pass.

    Parameters
    ----------
    labels
        Instance label image, 0 = background; ids need not be sequential.

    Returns
    -------
    ids : numpy.ndarray
        int64 ids present, ascending.
    slices : list of tuple of slice
        Bounding box of each id (as from :func:`scipy.ndimage.find_objects`).
    """
    labels = check_labels(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64), []
    top = int(labels.max())
    if top == 0:
        return np.zeros(0, dtype=np.int64), []
    if top > 2 * labels.size + 65536 or labels.dtype == np.uint64:
        # huge sparse ids: find_objects would allocate one entry per possible id
        values, inverse = np.unique(labels, return_inverse=True)
        dense = inverse.reshape(labels.shape).astype(np.intp)
        if values[0] != 0:
            dense += 1
            values = np.concatenate([[0], values])
        found = ndimage.find_objects(dense)
        ids = values[1:]
    else:
        found = ndimage.find_objects(labels)
        ids = np.arange(1, len(found) + 1)
    keep = [k for k, s in enumerate(found) if s is not None]
    return ids[keep].astype(np.int64), [found[k] for k in keep]


def object_centers(
    labels: np.ndarray, method: str = "medoid", spacing: Sequence[float] | None = None
) -> dict[int, tuple[int, ...]]:
    """Centre pixel of every object of a label image.

    Parameters
    ----------
    labels
        Instance label image ``(*spatial)``, 0 = background, any ids.
    method
        ``"medoid"`` (default), ``"approximate_medoid"`` or ``"centroid"``.
    spacing
        Physical pixel size per axis, e.g. ``(anisotropy, 1, 1)`` in 3D.

    Returns
    -------
    dict
        ``{id: (index per axis)}``. Medoid and approximate medoid are pixels of the object (also
        for objects of several components); the centroid may not be.

    Examples
    --------
    >>> labels = np.zeros((5, 5), int); labels[1:4, 1:4] = 7
    >>> object_centers(labels)
    {7: (2, 2)}
    """
    _check_method(method)
    labels = check_labels(labels)
    ids, slices = object_slices(labels)
    centers: dict[int, tuple[int, ...]] = {}
    for obj_id, box in zip(ids, slices, strict=True):
        coords = np.argwhere(labels[box] == obj_id)
        coords += np.array([s.start for s in box])
        centers[int(obj_id)] = tuple(int(v) for v in center_of(coords, method, spacing))
    return centers


def center_image(labels: np.ndarray, centers: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Image of the shape of ``labels``: each object's id at its centre pixel, 0 elsewhere.

    Parameters
    ----------
    labels
        Label image (only its shape is used) or anything with a ``shape``.
    centers
        ``{id: centre index}`` as from :func:`object_centers`.

    Returns
    -------
    numpy.ndarray
        int64 array.
    """
    shape = np.shape(labels)
    out = np.zeros(shape, dtype=np.int64)
    for obj_id, center in centers.items():
        index = tuple(int(v) for v in center)
        if len(index) != len(shape) or any(
            not 0 <= v < n for v, n in zip(index, shape, strict=True)
        ):
            raise ValueError(f"centre {index} of object {obj_id} lies outside shape {shape}")
        out[index] = obj_id
    return out
