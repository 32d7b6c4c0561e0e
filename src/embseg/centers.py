"""Object centres: exact medoid, approximate medoid and centroid, N-D and anisotropic.

All functions take the pixel coordinates of one object as an integer array ``(n, D)`` (array-axis
order) and an optional ``spacing`` (physical size of a pixel per axis, e.g. ``(2.18, 1, 1)`` for a
ZYX stack with anisotropy 2.18); distances are Euclidean in physical units.

* :func:`medoid` -- the object pixel with the smallest sum of distances to all object pixels.
  Always a pixel of the object. Exact, in bounded memory and fast (see below).
* :func:`approximate_medoid` -- the object pixel closest to the per-axis median point.
* :func:`centroid` -- the rounded mean coordinate; may lie outside a non-convex object.

Exact medoid by FFT (pixel objects of moderate extent, the usual case)
--------------------------------------------------------------------
For integer pixel coordinates, ``f(p) = sum_q |p - q|`` at every pixel of the bounding box is
one convolution of the object's mask with the distance kernel ``|v|`` (physical units), done by
FFT on a grid of at least ``2 n - 1`` per axis (no wrap-around): ``O(A log A)`` for a box of
``A`` pixels instead of ``O(n^2)``. FFT sums carry rounding of ~1e-15 of ``n * diameter``; every
pixel within ``TIE_RTOL`` of the smallest FFT sum plus a margin of ``1e-10 * n * diameter``
(far above that rounding) is a candidate. One candidate (the usual case) is the medoid; several
(ties, near ties) are settled by their exact sums, so the result is the brute-force medoid with
its tie rule. :func:`object_centers` batches the FFTs of all objects of a label image by grid
size; objects of up to ``_SMALL_OBJECT_MAX`` pixels (most objects of a training crop) skip the
FFT and take the compiled brute force of :mod:`embseg.centers_kernel` (≈0.7 ns per pixel pair,
no set-up), with the same tie rule. Objects whose grid would exceed ``_FFT_MAX_PIXELS``, and
non-integer coordinates, take the bounded search below.

Exact medoid without an ``n x n`` matrix (large or sparse objects)
------------------------------------------------------------------
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

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage
from scipy.spatial.distance import cdist

from embseg.centers_kernel import box_medoids
from embseg.errors import UserError

#: Centre methods accepted by :func:`center_of` and :func:`object_centers`.
METHODS = ("medoid", "approximate_medoid", "centroid")

#: Relative tolerance under which two sums of distances count as tied.
TIE_RTOL = 1e-9
#: Objects up to this many pixels get the chunked brute force when the FFT pass does not apply
#: (non-integer coordinates, or a bounding box too large for it); faster than bounding there.
_BRUTE_FORCE_MAX = 512
#: Objects up to this many pixels always get the brute force (cheaper than any set-up).
_BRUTE_FORCE_MIN = 24
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


#: Objects whose bounding box (doubled per axis, for the linear convolution) has at most this
#: many pixels get their sums of distances for all pixels at once by FFT convolution.
_FFT_MAX_PIXELS = 1 << 21
#: Candidates of the FFT pass are the pixels within this relative tolerance (of ``n * max
#: distance``, far above float64 FFT rounding, ~1e-15 of it) of the smallest FFT sum, on top
#: of the tie tolerance; they are then evaluated exactly.
_FFT_RTOL = 1e-10


def _distance_kernel(shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """``|v|`` (physical units) on a circular grid of ``shape``: index ``i`` per axis stands for
    the displacement ``i`` or ``i - L``, whichever is shorter."""
    axes = []
    for d, n in enumerate(shape):
        i = np.arange(n, dtype=np.float64)
        axes.append(np.minimum(i, n - i) * spacing[d])
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(sum(g * g for g in grids))


def _fft_size(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... (``2**k`` or ``3 * 2**k``) that is ``>= n``: FFT
    friendly, and few distinct sizes, so that objects batch into few shapes."""
    size = max(8, 1 << (int(n) - 1).bit_length())
    return size * 3 // 4 if size > 8 and size * 3 // 4 >= n else size


def _fft_shape(box: Sequence[int]) -> tuple[int, ...]:
    """Convolution grid for a box: at least ``2 * n - 1`` per axis, so nothing wraps around."""
    return tuple(_fft_size(2 * int(n) - 1) for n in box)


@functools.lru_cache(maxsize=64)
def _kernel_spectrum(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    spectrum = sp_fft.rfftn(_distance_kernel(shape, np.asarray(spacing)))
    spectrum.flags.writeable = False
    return spectrum


def _convolved_sums(masks: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``sum_q mask(q) |p - q|`` for every grid point ``p`` of each of a batch ``(G, *L)`` of
    zero-padded weight masks, by FFT (float64, single-threaded pocketfft)."""
    axes = tuple(range(1, masks.ndim))
    shape = masks.shape[1:]
    kernel = _kernel_spectrum(tuple(shape), tuple(float(v) for v in spacing))
    spectrum = sp_fft.rfftn(masks, axes=axes)
    spectrum *= kernel
    return sp_fft.irfftn(spectrum, s=shape, axes=axes)


def _medoid_from_sums(approx: np.ndarray, points: np.ndarray, weight_scale: float) -> int:
    """The exact medoid row given approximate sums ``approx`` for every row of ``points``.

    Rows whose approximate sum could be within the tie tolerance of the true minimum are
    evaluated exactly (usually one: then no exact sum is needed at all).
    """
    best = float(approx.min())
    slack = _FFT_RTOL * weight_scale
    limit = best + TIE_RTOL * abs(best) + 3 * slack
    candidates = np.flatnonzero(approx <= limit)
    if candidates.size == 1:
        return int(candidates[0])
    return _first_minimum(sum_of_distances(points[candidates], points), candidates)


def _medoid_fft(coords: np.ndarray, points: np.ndarray, spacing: np.ndarray) -> int | None:
    """Medoid row by FFT convolution over the object's bounding box, or None if the box is too
    large for it."""
    low = coords.min(axis=0)
    box = coords.max(axis=0) - low + 1
    shape = _fft_shape(box)
    if math.prod(shape) > _FFT_MAX_PIXELS:
        return None
    local = coords - low
    mask = np.zeros((1, *shape), dtype=np.float64)
    np.add.at(mask[0], tuple(local.T), 1.0)  # duplicate rows count twice, as in the sums
    sums = _convolved_sums(mask, spacing)[0][tuple(local.T)]
    return _medoid_from_sums(sums, points, len(points) * _diameter(box, spacing))


def _diameter(box: np.ndarray, spacing: np.ndarray) -> float:
    return float(np.sqrt((((np.asarray(box) - 1) * spacing) ** 2).sum())) + 1.0


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
    pixel_size = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if n <= _BRUTE_FORCE_MIN:
        return _first_minimum(sum_of_distances(points, points), np.arange(n))
    if np.issubdtype(np.asarray(coords).dtype, np.integer):
        row = _medoid_fft(np.asarray(coords, dtype=np.int64), points, pixel_size)
        if row is not None:
            return row
    if n <= _BRUTE_FORCE_MAX:
        return _first_minimum(sum_of_distances(points, points), np.arange(n))
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
    return centers_in_boxes(labels, ids, slices, method, spacing)


def centers_in_boxes(
    labels: np.ndarray,
    ids: Sequence[int],
    boxes: Sequence[tuple[slice, ...]],
    method: str = "medoid",
    spacing: Sequence[float] | None = None,
) -> dict[int, tuple[int, ...]]:
    """Centre pixel of each object ``ids[k]`` of ``labels``, given a box that holds all its
    pixels (``boxes[k]``, need not be tight): :func:`object_centers` for these objects, without
    searching the image for them.
    """
    name = _check_method(method)
    ids_array = np.asarray(ids, dtype=np.int64)
    if name == "medoid":
        return _object_medoids(labels, ids_array, list(boxes), spacing)
    centers: dict[int, tuple[int, ...]] = {}
    for obj_id, box in zip(ids_array.tolist(), boxes, strict=True):
        coords = np.argwhere(labels[box] == obj_id) + np.array([b.start for b in box])
        centers[obj_id] = tuple(int(v) for v in center_of(coords, method, spacing))
    return centers


#: Objects of up to this many pixels get the compiled brute force (:mod:`embseg.centers_kernel`).
_SMALL_OBJECT_MAX = 600

#: Up to this many objects share one FFT grid (the largest of theirs): for the few cut objects
#: of a training crop, one batched FFT costs less than one per size class.
_ONE_GROUP_MAX = 16


def _object_medoids(
    labels: np.ndarray, ids: np.ndarray, slices: list[tuple[slice, ...]], spacing: Sequence[float] | None
) -> dict[int, tuple[int, ...]]:
    """Exact medoids of all objects of a label image, the FFT pass batched over objects.

    Objects are grouped by convolution grid (:func:`_fft_shape` of their bounding box); each
    group takes one batched FFT and one vectorised candidate test. An object with a single
    candidate (the usual case) needs nothing else; the others are settled by exact sums of
    their candidates. The result equals :func:`medoid` of every object's pixels in C order.
    """
    ndim = labels.ndim
    pixel_size = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if pixel_size.shape != (ndim,) or not np.all(pixel_size > 0):
        raise UserError(f"spacing must have {ndim} positive values, got {pixel_size.tolist()}")
    order = ids.tolist()
    centers: dict[int, tuple[int, ...]] = {}
    if len(ids):  # small objects: all pairwise distances, compiled (no FFT set-up)
        lo = np.array([[b.start for b in box] for box in slices], dtype=np.int64)
        hi = np.array([[b.stop for b in box] for box in slices], dtype=np.int64)
        found = box_medoids(labels, ids, lo, hi, pixel_size, _SMALL_OBJECT_MAX, TIE_RTOL)
        done = found[:, 0] >= 0
        for obj_id, center in zip(ids[done].tolist(), found[done].tolist(), strict=True):
            centers[obj_id] = tuple(center)
        keep = np.flatnonzero(~done)
        ids, slices = ids[keep], [slices[k] for k in keep.tolist()]
    # Grouped by the size class of the longest box side (few groups, hence few FFT calls), or
    # all in one group when there are few objects; a group's grid is the per-axis largest of
    # its members' grids.
    groups: dict[int, list[tuple[int, tuple[slice, ...]]]] = {}
    grids: dict[int, np.ndarray] = {}
    for obj_id, box in zip(ids.tolist(), slices, strict=True):
        grid = _fft_shape([b.stop - b.start for b in box])
        if math.prod(grid) > _FFT_MAX_PIXELS:
            coords = np.argwhere(labels[box] == obj_id) + np.array([b.start for b in box])
            centers[obj_id] = tuple(int(v) for v in center_of(coords, "medoid", spacing))
            continue
        key = 0 if len(ids) <= _ONE_GROUP_MAX else max(grid)
        groups.setdefault(key, []).append((obj_id, box))
        grids[key] = np.maximum(grids.get(key, grid), grid)
    for key, members in groups.items():
        shape = tuple(int(n) for n in grids[key])
        per_batch = max(1, _BLOCK_VALUES // math.prod(shape))
        for start in range(0, len(members), per_batch):
            _medoid_batch(labels, members[start : start + per_batch], shape, pixel_size, spacing, centers)
    return {k: centers[k] for k in order}


def _medoid_batch(
    labels: np.ndarray,
    batch: list[tuple[int, tuple[slice, ...]]],
    shape: tuple[int, ...],
    pixel_size: np.ndarray,
    spacing: Sequence[float] | None,
    centers: dict[int, tuple[int, ...]],
) -> None:
    """Medoids of a batch of objects sharing one convolution grid, into ``centers``."""
    masks = np.zeros((len(batch), *shape), dtype=bool)
    extents = np.empty((len(batch), len(shape)), dtype=np.int64)
    for g, (obj_id, box) in enumerate(batch):
        extents[g] = [b.stop - b.start for b in box]
        masks[(g, *(slice(0, int(n)) for n in extents[g]))] = labels[box] == obj_id
    sums = _convolved_sums(masks.astype(np.float64), pixel_size).reshape(len(batch), -1)
    flat_masks = masks.reshape(len(batch), -1)
    sums[~flat_masks] = np.inf
    best = sums.min(axis=1)
    sizes = flat_masks.sum(axis=1)
    diameter = np.sqrt((((extents - 1) * pixel_size) ** 2).sum(axis=1)) + 1.0
    limit = best + TIE_RTOL * np.abs(best) + 3 * _FFT_RTOL * sizes * diameter
    n_candidates = (sums <= limit[:, None]).sum(axis=1)
    where = sums.argmin(axis=1)
    for g, (obj_id, box) in enumerate(batch):
        if n_candidates[g] == 1 and sizes[g] > _BRUTE_FORCE_MIN:
            local = np.unravel_index(int(where[g]), shape)
        else:
            mask = masks[(g, *(slice(0, int(n)) for n in extents[g]))]
            coords = np.argwhere(mask)
            if sizes[g] <= _BRUTE_FORCE_MIN:
                row = medoid(coords, spacing)
            else:
                approx = sums[g].reshape(shape)[tuple(coords.T)]
                row = _medoid_from_sums(approx, _physical(coords, spacing), float(sizes[g] * diameter[g]))
            local = coords[row]
        centers[obj_id] = tuple(int(b.start + v) for b, v in zip(box, local, strict=True))


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
