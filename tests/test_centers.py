"""Object centres: the exact medoid against brute force, approximate medoid, centroid, and the
per-label-image helpers."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from embseg.centers import (
    _BRUTE_FORCE_MAX,
    TIE_RTOL,
    approximate_medoid,
    center_image,
    center_of,
    centroid,
    medoid,
    object_centers,
    object_slices,
)
from embseg.errors import UserError


def brute_force_sums(coords: np.ndarray, spacing=None) -> np.ndarray:
    """Full distance matrix (only for small objects)."""
    points = coords.astype(np.float64) * (1.0 if spacing is None else np.asarray(spacing, float))
    diff = points[:, None, :] - points[None, :, :]
    return np.sqrt((diff**2).sum(-1)).sum(1)


def chunked_sums(coords: np.ndarray, spacing=None, rows: int = 256) -> np.ndarray:
    """The same sums, a block of rows at a time, written independently of the module."""
    points = coords.astype(np.float64) * (1.0 if spacing is None else np.asarray(spacing, float))
    out = np.empty(len(points))
    for start in range(0, len(points), rows):
        block = points[start : start + rows]
        diff = block[:, None, :] - points[None, :, :]
        out[start : start + rows] = np.sqrt((diff**2).sum(-1)).sum(1)
    return out


def brute_medoid(sums: np.ndarray) -> int:
    """Lowest index among floating-point ties of the minimum (the documented rule)."""
    best = sums.min()
    return int(np.flatnonzero(sums <= best + TIE_RTOL * best)[0])


def random_blob(rng: np.random.Generator, shape: tuple[int, ...], smooth: float, frac: float):
    """Coordinates of a random, possibly non-convex and multi-component blob."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), smooth)
    mask = field > np.quantile(field, 1 - frac)
    return np.argwhere(mask)


def disc(radius: int, ndim: int = 2) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim).reshape(ndim, -1).T
    return grid[((grid - radius) ** 2).sum(1) <= radius * radius]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ndim", [2, 3])
def test_medoid_equals_brute_force_on_random_shapes(seed, ndim):
    rng = np.random.default_rng(seed)
    shape = (48, 48) if ndim == 2 else (14, 20, 20)
    # sizes on both sides of the brute-force threshold, so the bounded search is exercised
    frac = [0.05, 0.15, 0.5][seed % 3]
    coords = random_blob(rng, shape, smooth=2.0 + seed % 2, frac=frac)
    spacing = None if seed % 2 == 0 else ((2.5,) + (1.0,) * (ndim - 1))
    sums = brute_force_sums(coords, spacing)
    assert medoid(coords, spacing) == brute_medoid(sums)


def test_bounded_search_is_used_and_exact_on_larger_objects(monkeypatch):
    import embseg.centers as centers

    monkeypatch.setattr(centers, "_FFT_MAX_PIXELS", 0)  # the FFT pass would take these
    rng = np.random.default_rng(11)
    for spacing in [None, (1.0, 3.0)]:
        coords = random_blob(rng, (64, 64), smooth=4.0, frac=0.4)
        assert len(coords) > _BRUTE_FORCE_MAX
        assert medoid(coords, spacing) == brute_medoid(chunked_sums(coords, spacing))
    coords = random_blob(rng, (16, 32, 32), smooth=3.0, frac=0.3)
    assert len(coords) > _BRUTE_FORCE_MAX
    spacing = (2.18, 1.0, 1.0)
    assert medoid(coords, spacing) == brute_medoid(chunked_sums(coords, spacing))


@pytest.mark.parametrize("seed", range(4))
def test_bound_alone_guarantees_exactness(monkeypatch, seed):
    """With a deliberately bad starting point the pruning bound must still find the medoid."""
    import embseg.centers as centers

    monkeypatch.setattr(centers, "_FFT_MAX_PIXELS", 0)
    monkeypatch.setattr(centers, "_weiszfeld", lambda points, weights: points.max(axis=0) + 7.0)
    monkeypatch.setattr(centers, "_CANDIDATE_BATCH", 2)
    rng = np.random.default_rng(100 + seed)
    shape = (56, 56) if seed < 2 else (12, 24, 24)
    coords = random_blob(rng, shape, smooth=3.0, frac=0.35)
    spacing = None if seed % 2 == 0 else (2.0,) + (1.0,) * (len(shape) - 1)
    assert len(coords) > _BRUTE_FORCE_MAX
    assert medoid(coords, spacing) == brute_medoid(chunked_sums(coords, spacing))


@pytest.mark.parametrize("seed", range(4))
def test_fft_pass_equals_brute_force_and_settles_ties_exactly(monkeypatch, seed):
    import embseg.centers as centers

    calls = []
    original = centers._convolved_sums
    monkeypatch.setattr(centers, "_convolved_sums", lambda m, s: calls.append(m.shape) or original(m, s))
    rng = np.random.default_rng(200 + seed)
    shape = (40, 52) if seed < 2 else (10, 22, 18)
    coords = random_blob(rng, shape, smooth=2.5, frac=0.3)
    coords = coords[rng.permutation(len(coords))]  # any row order: ties go to the lowest row
    spacing = None if seed % 2 == 0 else (2.18,) + (1.0,) * (len(shape) - 1)
    assert medoid(coords, spacing) == brute_medoid(chunked_sums(coords, spacing))
    assert calls, "the FFT pass was not used"
    for side in (6, 7, 30):  # even sides: 4 exactly tied centre pixels
        square = np.argwhere(np.ones((side,) * 2, bool))[::-1].copy()
        assert medoid(square) == brute_medoid(brute_force_sums(square))


@pytest.mark.parametrize("small_max", [0, 300, 100_000])
def test_object_centers_batched_fft_equals_per_object_brute_force(monkeypatch, small_max):
    """Every object by the batched FFT pass (0), the small ones by the compiled brute force
    (300), or every object by it (100,000): the brute-force medoids each time."""
    import embseg.centers as centers_module

    monkeypatch.setattr(centers_module, "_SMALL_OBJECT_MAX", small_max)
    rng = np.random.default_rng(21)
    for shape, spacing in (((96, 96), None), ((96, 96), (1.0, 1.7)), ((16, 40, 40), (2.18, 1.0, 1.0))):
        field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
        labels, n = ndimage.label(field > np.quantile(field, 0.6))
        labels[tuple(slice(0, 6) for _ in shape)] = n + 5  # a square: exact ties
        assert n >= 5
        found = object_centers(labels, "medoid", spacing)
        for obj_id, box in zip(*object_slices(labels), strict=True):
            coords = np.argwhere(labels[box] == obj_id) + [b.start for b in box]
            expected = coords[brute_medoid(chunked_sums(coords, spacing))]
            assert found[int(obj_id)] == tuple(int(v) for v in expected), obj_id
        assert list(found) == sorted(found)


def test_symmetric_ties_go_to_the_lowest_index():
    square = np.argwhere(np.ones((4, 4), bool))  # 4 tied central pixels
    assert medoid(square) == brute_medoid(brute_force_sums(square)) == 5
    big_square = np.argwhere(np.ones((40, 40), bool))  # bounded path, 4 tied centre pixels
    assert medoid(big_square) == brute_medoid(chunked_sums(big_square))
    assert tuple(big_square[medoid(big_square)]) == (19, 19)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 5)),
        min_size=1,
        max_size=80,
    ),
    st.floats(0.2, 5.0),
)
def test_medoid_matches_brute_force_on_arbitrary_point_sets(points, z_scale):
    coords = np.array(points)
    spacing = (1.0, 1.0, z_scale)
    assert medoid(coords, spacing) == brute_medoid(brute_force_sums(coords, spacing))


def test_anisotropic_spacing_changes_the_medoid():
    # a plus sign: a long arm along axis 0 and a long arm along axis 1 crossing off-centre
    coords = np.array([[i, 10] for i in range(0, 21)] + [[5, j] for j in range(0, 21) if j != 10])
    iso = medoid(coords)
    stretched = medoid(coords, spacing=(10.0, 1.0))
    assert iso == brute_medoid(brute_force_sums(coords))
    assert stretched == brute_medoid(brute_force_sums(coords, (10.0, 1.0)))
    assert tuple(coords[iso]) != tuple(coords[stretched])


def test_medoid_is_translation_invariant_and_a_pixel():
    rng = np.random.default_rng(5)
    coords = random_blob(rng, (40, 40), 2.0, 0.3)
    shifted = coords + np.array([1000, 2345])
    assert medoid(coords) == medoid(shifted)


def ring_c_shape() -> np.ndarray:
    """A thick C: the centroid lies in the hole."""
    yy, xx = np.indices((61, 61))
    r = np.hypot(yy - 30, xx - 30)
    mask = (r >= 18) & (r <= 28) & ~((xx > 30) & (np.abs(yy - 30) < 8))
    return np.argwhere(mask)


def test_non_convex_object_centroid_outside_medoid_inside():
    coords = ring_c_shape()
    members = {tuple(c) for c in coords}
    c = centroid(coords)
    assert tuple(c) not in members
    m = center_of(coords, "medoid")
    assert tuple(m) in members
    assert medoid(coords) == brute_medoid(chunked_sums(coords))
    a = center_of(coords, "approximate-medoid")
    assert tuple(a) in members


def test_ten_thousand_pixel_object_exact_in_bounded_memory():
    rng = np.random.default_rng(7)
    yy, xx = np.indices((140, 140))
    mask = np.hypot(yy - 70.3, (xx - 68.1) * 1.1) < 61
    mask &= rng.random(mask.shape) > 0.02  # a few holes break the symmetry
    coords = np.argwhere(mask)
    assert len(coords) >= 10_000
    tracemalloc.start()
    try:
        result = medoid(coords)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a full n x n float64 matrix would be 800 MB
    assert peak < 64 * 2**20
    assert result == brute_medoid(chunked_sums(coords))


def test_approximate_medoid_and_centroid():
    rng = np.random.default_rng(8)
    for _ in range(5):
        coords = random_blob(rng, (30, 30), 2.0, 0.2)
        k = approximate_medoid(coords)
        median = np.median(coords, axis=0)
        d = ((coords - median) ** 2).sum(1)
        assert d[k] == d.min()
        np.testing.assert_array_equal(centroid(coords), np.rint(coords.mean(0)))
    coords = np.array([[0, 0], [0, 1], [0, 2], [10, 2]])
    assert approximate_medoid(coords) == 1
    # spacing weighs the axes: median (0, 1.5); with axis 1 stretched, (0, 1) and (0, 2) tie
    # exactly and the first wins
    assert approximate_medoid(np.array([[0, 2], [3, 1], [0, 0]]), spacing=(10.0, 1.0)) == 0


def test_bad_inputs():
    with pytest.raises(ValueError):
        medoid(np.zeros((0, 2), int))
    with pytest.raises(UserError):
        medoid(np.zeros((3, 2), int), spacing=(1.0,))
    with pytest.raises(UserError):
        center_of(np.zeros((3, 2), int), "mean")
    with pytest.raises(UserError):
        object_centers(np.zeros((4, 4), float))
    with pytest.raises(UserError):
        object_centers(-np.ones((4, 4), int))


def labels_with_gaps() -> np.ndarray:
    labels = np.zeros((40, 50), np.uint16)
    labels[2:10, 3:12] = 3
    labels[20:35, 5:9] = 17
    labels[20:24, 9:30] = 17  # an L
    labels[30:33, 40:45] = 1000
    labels[5:7, 40:42] = 1000  # a second component of id 1000
    return labels


@pytest.mark.parametrize("method", ["medoid", "approximate_medoid", "centroid"])
def test_object_centers_non_sequential_ids(method):
    labels = labels_with_gaps()
    centers = object_centers(labels, method)
    assert sorted(centers) == [3, 17, 1000]
    for obj_id, c in centers.items():
        coords = np.argwhere(labels == obj_id)
        np.testing.assert_array_equal(c, center_of(coords, method))
        if method != "centroid":
            assert labels[c] == obj_id
    image = center_image(labels, centers)
    assert image.dtype == np.int64 and image.shape == labels.shape
    for obj_id, c in centers.items():
        assert image[c] == obj_id and (image == obj_id).sum() == 1
    assert (image > 0).sum() == 3


def test_object_centers_multi_component_medoid_is_object_pixel_and_uses_spacing():
    labels = np.zeros((12, 30, 30), np.int32)
    labels[2:6, 2:8, 2:8] = 5
    labels[7:11, 20:28, 20:28] = 5
    spacing = (3.0, 1.0, 1.0)
    centers = object_centers(labels, "medoid", spacing=spacing)
    assert labels[centers[5]] == 5
    coords = np.argwhere(labels == 5)
    expected = coords[brute_medoid(chunked_sums(coords, spacing))]
    assert centers[5] == tuple(expected)


def test_object_slices_handles_huge_ids():
    labels = np.zeros((10, 10), np.uint64)
    labels[1:3, 1:4] = 2**40
    labels[5:9, 6:8] = 7
    ids, slices = object_slices(labels)
    assert ids.tolist() == [7, 2**40]
    assert slices[1] == (slice(1, 3), slice(1, 4))
    assert slices[0] == (slice(5, 9), slice(6, 8))
    centers = object_centers(labels.astype(np.int64))
    assert labels[centers[2**40]] == 2**40
    assert object_slices(np.zeros((3, 3), np.uint8))[0].size == 0


def test_center_image_rejects_outside_centres():
    with pytest.raises(ValueError):
        center_image(np.zeros((4, 4), int), {1: (4, 0)})


@pytest.mark.parametrize("method", ["medoid", "approximate_medoid", "centroid"])
def test_centers_in_loose_boxes_equal_object_centers(method):
    from embseg.centers import centers_in_boxes, object_slices

    rng = np.random.default_rng(3)
    labels = np.zeros((60, 70), np.int64)
    for k in range(1, 9):  # overlapping random boxes: some objects are cut into pieces
        y, x = rng.integers(0, 50), rng.integers(0, 60)
        labels[y : y + rng.integers(3, 15), x : x + rng.integers(3, 15)] = k
    ids, tight = object_slices(labels)
    loose = [tuple(slice(max(0, s.start - 3), s.stop + 2) for s in box) for box in tight]
    expected = object_centers(labels, method)
    assert centers_in_boxes(labels, ids, loose, method) == expected
    assert centers_in_boxes(labels, ids[:3], loose[:3], method) == {int(k): expected[int(k)] for k in ids[:3]}
