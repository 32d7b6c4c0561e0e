"""Clustering: equal to a plain literal implementation of the algorithm, plus hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from conftest import dataset
from embseg.cluster import _at_least, _strictly_above, candidate_geometry, cluster, seed_map
from embseg.embedding import bandwidth, embeddings, grid_step, likelihood, split_raw

torch.set_num_threads(1)

H = 1.0 / 1023.0


# ----------------------------------------------------------------------------- reference


def literal_cluster(raw, step, seed_thresh=0.9, fg_thresh=0.5, min_size=10, origin=None, max_radius=None):
    """The algorithm as written in DESIGN.md, over all candidates each iteration (with
    ``max_radius``: only pixels whose phi = 0.5 ellipse stays within it may be seeds).

    Returns the labels and counts of what happened (to check that a test exercises a rule).
    """
    ndim = len(step)
    offsets, sigmas, logit = split_raw(raw, ndim)
    seed = torch.sigmoid(logit.float()).double()
    emb = embeddings(offsets.double(), step, origin)
    s = bandwidth(sigmas.double())
    mask = seed > fg_thresh
    emb_m, s_m, seed_m = emb[:, mask], s[:, mask], seed[mask]
    n = seed_m.shape[0]
    unclustered = torch.ones(n, dtype=torch.bool)
    labels_m = torch.zeros(n, dtype=torch.int64)
    stats = {"accepted": 0, "too_small": 0, "mostly_clustered": 0, "overwritten": 0}
    may_seed = torch.ones(n, dtype=torch.bool)
    if max_radius is not None:
        semi_axes_px = torch.sqrt(math.log(2.0) / s_m) / torch.tensor(step, dtype=torch.float64).unsqueeze(1)
        may_seed = (semi_axes_px <= torch.tensor(max_radius, dtype=torch.float64).unsqueeze(1)).all(0)
    stats["barred"] = int((~may_seed & (seed_m >= seed_thresh)).sum())
    count = 1
    while bool((unclustered & may_seed).any()):
        i = int(
            torch.argmax(torch.where(unclustered & may_seed, seed_m, torch.tensor(-1.0, dtype=torch.float64)))
        )
        if float(seed_m[i]) < seed_thresh:
            break
        phi = likelihood(emb_m, emb_m[:, i], s_m[:, i])
        proposal = phi > 0.5
        size = int(proposal.sum())
        free_fraction = float(unclustered[proposal].double().mean())
        if size >= min_size and free_fraction > 0.5:
            stats["overwritten"] += int((labels_m[proposal] > 0).sum())
            labels_m[proposal] = count
            count += 1
            stats["accepted"] += 1
        elif size < min_size:
            stats["too_small"] += 1
        else:
            stats["mostly_clustered"] += 1
        unclustered[proposal] = False
        unclustered[i] = False
    labels = torch.zeros(mask.shape, dtype=torch.int64)
    labels[mask] = labels_m
    return labels.numpy(), stats


# ----------------------------------------------------------------------------- synthetic outputs


def random_raw(shape, step, rng, seed_smooth=2.0):
    """Random-ish raw outputs: jittered embeddings, mixed radii, smooth seed logits."""
    ndim = len(shape)
    step = np.asarray(step)
    # Embeddings pulled towards a coarse lattice plus noise: proposals overlap and vary in size.
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
    target = np.round(grid / 3.0) * 3.0 + rng.normal(0, 1.0, size=grid.shape)
    displacement = (target - grid) * step.reshape((ndim,) + (1,) * ndim)
    offsets = np.arctanh(displacement)
    radius_px = rng.uniform(0.8, 4.0, size=shape)
    sigmas = np.stack(
        [
            np.log(math.log(2.0) / (radius_px * step[d] * rng.uniform(0.7, 1.3, size=shape)) ** 2)
            / 10
            for d in range(ndim)
        ]
    )
    noise = ndimage.gaussian_filter(rng.normal(size=shape), seed_smooth)
    logit = 3.0 * noise / noise.std() + 1.0
    raw = np.concatenate([offsets, sigmas, logit[None]]).astype(np.float32)
    return torch.from_numpy(raw)


def place_centers(shape, n_objects, min_dist, rng, spacing, margin):
    """Random centres (index space) at least ``min_dist`` apart in physical units."""
    centers = []
    attempts = 0
    spacing = np.asarray(spacing, dtype=np.float64)
    while len(centers) < n_objects and attempts < 200 * n_objects:
        attempts += 1
        c = np.array([rng.integers(m, n - m) for n, m in zip(shape, margin, strict=True)])
        if centers and np.min(np.linalg.norm((np.array(centers) - c) * spacing, axis=1)) < min_dist:
            continue
        centers.append(c)
    return np.array(centers)


def ideal_raw(shape, n_objects, radius_px, step, rng, jitter_px=0.3):
    """Ideal raw outputs of balls (radius in X pixels): offsets point to the centre pixel.

    Returns ``(raw, labels)``.
    """
    ndim = len(shape)
    spacing = np.asarray(step) / step[-1]
    half = np.ceil(radius_px / spacing).astype(int)
    centers = place_centers(shape, n_objects, 2 * radius_px + 3, rng, spacing, half + 1)
    labels = np.zeros(shape, np.int64)
    dist = np.full(shape, np.inf)
    for k, c in enumerate(centers, start=1):
        box = tuple(slice(ci - hi, ci + hi + 1) for ci, hi in zip(c, half, strict=True))
        local = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij"))
        d = np.sqrt(
            (
                (
                    (local - c.reshape((ndim,) + (1,) * ndim))
                    * spacing.reshape((ndim,) + (1,) * ndim)
                )
                ** 2
            ).sum(0)
        )
        inside = d <= radius_px
        labels[box][inside] = k
        dist[box][inside] = d[inside]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
    fg = labels > 0
    target = grid.copy()
    for d in range(ndim):
        target[d][fg] = centers[labels[fg] - 1, d] + rng.normal(
            0, jitter_px / spacing[d], size=int(fg.sum())
        )
    offsets = np.arctanh((target - grid) * np.asarray(step).reshape((ndim,) + (1,) * ndim))
    s = math.log(2.0) / (3.0 * step[-1]) ** 2  # 0.5-level radius of 3 px
    sigmas = np.full((ndim, *shape), math.log(s) / 10)
    logit = np.where(fg, 6.0 - 4.0 * np.where(fg, dist, 0) / radius_px, -6.0)
    raw = np.concatenate([offsets, sigmas, logit[None]]).astype(np.float32)
    return torch.from_numpy(raw), labels


def same_partition(a, b):
    """True if two label images are equal up to renumbering (background 0 fixed)."""
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


# ----------------------------------------------------------------------------- equality to literal


@pytest.mark.parametrize(
    ("shape", "anisotropy", "rng_seed"),
    [((48, 64), 1.0, 0), ((40, 40), 1.0, 1), ((10, 24, 28), 2.0, 2), ((12, 20, 20), 1.0, 3)],
)
@pytest.mark.parametrize(("seed_thresh", "fg_thresh", "min_size"), [(0.9, 0.5, 5), (0.8, 0.6, 3)])
def test_random_outputs_equal_literal(
    shape, anisotropy, rng_seed, seed_thresh, fg_thresh, min_size
):
    rng = np.random.default_rng(rng_seed)
    step = grid_step(len(shape), anisotropy)
    raw = random_raw(shape, step, rng)
    expected, stats = literal_cluster(raw, step, seed_thresh, fg_thresh, min_size)
    got = cluster(raw, step, seed_thresh, fg_thresh, min_size)
    assert got.dtype == np.uint32
    assert got.shape == tuple(shape)
    np.testing.assert_array_equal(got, expected)
    # The data exercise every branch of the rule.
    assert stats["accepted"] >= 5
    assert stats["too_small"] > 0
    assert stats["mostly_clustered"] > 0
    assert stats["overwritten"] > 0


@pytest.mark.parametrize(
    ("shape", "anisotropy", "n_objects"), [((96, 96), 1.0, 12), ((16, 48, 48), 2.0, 8)]
)
def test_ideal_outputs_equal_literal_and_truth(shape, anisotropy, n_objects):
    rng = np.random.default_rng(4)
    step = grid_step(len(shape), anisotropy)
    raw, truth = ideal_raw(shape, n_objects, 5.0, step, rng)
    expected, stats = literal_cluster(raw, step, min_size=10)
    got = cluster(raw, step, min_size=10)
    np.testing.assert_array_equal(got, expected)
    assert stats["accepted"] == truth.max() == n_objects
    assert same_partition(got, truth)


def _random_2d_and_3d_equal_literal() -> None:
    """``cluster`` equals the literal algorithm on a random 2D and a random anisotropic 3D image."""
    for rng_seed, shape, anisotropy in [(0, (48, 64), 1.0), (2, (10, 24, 28), 2.0)]:
        rng = np.random.default_rng(rng_seed)
        step = grid_step(len(shape), anisotropy)
        raw = random_raw(shape, step, rng)
        expected, _ = literal_cluster(raw, step, 0.9, 0.5, 5)
        np.testing.assert_array_equal(cluster(raw, step, 0.9, 0.5, 5), expected)


@pytest.mark.parametrize("factor", [1e-3, 0.3, 1.0, 7.0, 1e6])
def test_grid_cell_width_does_not_change_the_labels(monkeypatch, factor):
    """Tiny cells (the cell cap then widens them), cells of about a box, and one cell for the
    whole image all give the literal labels: the grid only chooses which candidates are tested."""
    import embseg.cluster_kernel as kernel

    grid_shape = kernel.grid_shape
    seen = []

    def scaled(emb, semi_axes):
        lo, width, dims = grid_shape(emb, semi_axes)
        extent = (dims - 1) * width
        width = width * factor
        dims = np.floor(extent / width).astype(np.int64) + 1
        while np.prod(dims.astype(np.float64)) > 2 * emb.shape[1] + 1024:
            width = width * 1.5
            dims = np.floor(extent / width).astype(np.int64) + 1
        seen.append(int(np.prod(dims)))
        return lo, width, dims

    monkeypatch.setattr(kernel, "grid_shape", scaled)
    _random_2d_and_3d_equal_literal()
    assert len(seen) == 2
    if factor == 1e6:
        assert seen == [1, 1]
    if factor == 1e-3:
        assert min(seen) > 100


def test_grid_shape_caps_the_cells_and_ignores_non_finite_embeddings():
    from embseg.cluster_kernel import grid_shape

    rng = np.random.default_rng(0)
    emb = rng.random((3, 1000))
    emb[:, 5] = np.nan
    lo, width, dims = grid_shape(emb, np.full((4, 3), 1e-6))  # tiny ellipses: the cap decides
    assert np.prod(dims) <= 2 * 1000 + 1024
    np.testing.assert_allclose(lo, np.nanmin(emb, axis=1))
    assert np.all((dims - 1) * width <= np.nanmax(emb, axis=1) - lo + 1e-12)
    assert np.all(dims * width > np.nanmax(emb, axis=1) - lo)
    lo, width, dims = grid_shape(np.full((2, 10), np.nan), np.ones((1, 2)))
    assert np.all(dims == 1)


def test_a_seed_covering_the_image_equals_literal():
    """A seed whose ellipse holds every candidate (its box spans the whole grid)."""
    rng = np.random.default_rng(5)
    shape = (40, 48)
    step = grid_step(2)
    raw = random_raw(shape, step, rng)
    seed_px = raw[-1].argmax()
    raw[2:4].view(2, -1)[:, seed_px] = -2.0  # s = exp(-20): an ellipse over the whole image
    expected, stats = literal_cluster(raw, step, 0.9, 0.5, 5)
    got = cluster(raw, step, 0.9, 0.5, 5)
    np.testing.assert_array_equal(got, expected)
    assert stats["accepted"] == 1
    assert np.count_nonzero(got == 1) == np.count_nonzero(seed_map(raw) > 0.5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_non_finite_outputs_equal_literal(ndim):
    """NaN offsets (such pixels join no object), NaN, +inf and -inf raw sigmas at seeds (s NaN:
    an empty proposal; s = inf: an empty one; s = 0: every finite candidate)."""
    rng = np.random.default_rng(21 + ndim)
    shape = (40, 48) if ndim == 2 else (10, 20, 24)
    step = grid_step(ndim)
    raw = random_raw(shape, step, rng)
    flat = raw.view(raw.shape[0], -1)
    order = torch.argsort(flat[-1], descending=True)
    flat[0, order[5:4000:7]] = float("nan")  # some candidates, the 6th seed among them
    flat[ndim, order[0]] = float("nan")  # the first seed's bandwidth
    flat[ndim:2 * ndim, order[1]] = float("inf")
    flat[ndim, order[300]] = -float("inf")  # a later seed: s = 0 on one axis
    expected, stats = literal_cluster(raw, step, 0.9, 0.5, 5)
    assert stats["accepted"] > 3
    np.testing.assert_array_equal(cluster(raw, step, 0.9, 0.5, 5), expected)


def _cluster_in_child(raw, step):
    return cluster(raw, step, 0.9, 0.5, 5)


def test_clustering_works_in_a_forked_child():
    """The compiled loop runs in a forked worker (a data loader, a process pool) as in the parent."""
    import multiprocessing

    rng = np.random.default_rng(3)
    step = grid_step(2)
    raw = random_raw((40, 48), step, rng)
    expected = cluster(raw, step, 0.9, 0.5, 5)  # compiled (or loaded) in the parent first
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_cluster_in_child, (raw, step)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)
    assert expected.max() > 3


@pytest.mark.parametrize(("shape", "anisotropy"), [((48, 64), 1.0), ((10, 24, 28), 2.0)])
def test_max_radius_equals_literal(shape, anisotropy):
    rng = np.random.default_rng(11)
    step = grid_step(len(shape), anisotropy)
    raw = random_raw(shape, step, rng)  # radii 0.6 to 5.2 px
    max_radius = [2.5 / (step[d] / step[-1]) for d in range(len(shape))]
    expected, stats = literal_cluster(raw, step, 0.9, 0.5, 3, max_radius=max_radius)
    got = cluster(raw, step, 0.9, 0.5, 3, max_radius=max_radius)
    np.testing.assert_array_equal(got, expected)
    assert stats["barred"] > 0 and stats["accepted"] >= 5  # the rule bars some seeds, not all
    assert not np.array_equal(got, cluster(raw, step, 0.9, 0.5, 3))
    np.testing.assert_array_equal(cluster(raw, step, 0.9, 0.5, 3, max_radius=[1e9] * len(shape)),
                                  cluster(raw, step, 0.9, 0.5, 3))


def test_a_stray_wide_seed_does_not_swallow_the_image():
    rng = np.random.default_rng(12)
    step = grid_step(2)
    raw, truth = ideal_raw((96, 96), 8, 5.0, step, rng)
    corner = (slice(0, 3), slice(0, 3))  # a border artefact: confident seeds of a huge bandwidth
    raw[4][corner] = 12.0
    raw[2:4][(slice(None), *corner)] = math.log(math.log(2.0) / (400 * step[-1]) ** 2) / 10
    swallowed = cluster(raw, step, min_size=10)
    assert swallowed.max() == 1 and np.all(swallowed[truth > 0] == 1)  # one object: the whole image
    kept = cluster(raw, step, min_size=10, max_radius=(24, 24))
    inside = truth > 0
    assert same_partition(np.where(inside, kept, 0), truth)
    assert kept[corner].max() == 0  # the 9 corner pixels are fewer than min_size


def test_origin_only_shifts():
    rng = np.random.default_rng(5)
    step = grid_step(2)
    raw = random_raw((32, 32), step, rng)
    expected, _ = literal_cluster(raw, step, min_size=4, origin=(100, 37))
    np.testing.assert_array_equal(cluster(raw, step, min_size=4, origin=(100, 37)), expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_fg_thresh_honoured(ndim):
    rng = np.random.default_rng(6)
    shape = (40, 40) if ndim == 2 else (10, 20, 20)
    step = grid_step(ndim)
    raw = random_raw(shape, step, rng)
    seed = seed_map(raw)
    low = cluster(raw, step, fg_thresh=0.5, min_size=3)
    high = cluster(raw, step, fg_thresh=0.8, min_size=3)
    assert np.all(low[seed <= 0.5] == 0)
    assert np.all(high[seed <= 0.8] == 0)
    assert np.count_nonzero(high) < np.count_nonzero(low)
    np.testing.assert_array_equal(high, literal_cluster(raw, step, fg_thresh=0.8, min_size=3)[0])


# ----------------------------------------------------------------------------- hand-built cases


def row_raw(targets, logits, radius_px):
    """A 1-row 2D image whose pixel ``p`` embeds at X pixel ``targets[p]`` with given radius."""
    n = len(targets)
    p = np.arange(n, dtype=np.float64)
    raw = np.zeros((5, 1, n), np.float32)
    raw[1, 0] = np.arctanh((np.asarray(targets, dtype=np.float64) - p) * H)
    s = math.log(2.0) / (np.asarray(radius_px, dtype=np.float64) * H) ** 2
    raw[2, 0] = raw[3, 0] = np.log(s) / 10
    raw[4, 0] = logits
    return torch.from_numpy(raw)


def test_two_objects_in_seed_order():
    targets = [5] * 10 + [15] * 10
    logits = np.full(20, 3.0)
    logits[15], logits[5] = 5.0, 4.0  # object B is found first
    labels = cluster(row_raw(targets, logits, np.full(20, 2.0)), grid_step(2))
    np.testing.assert_array_equal(labels[0], [2] * 10 + [1] * 10)


def test_min_size_is_inclusive():
    targets = [4] * 9 + [15] * 10
    labels = cluster(
        row_raw(targets, np.full(19, 4.0), np.full(19, 2.0)), grid_step(2), min_size=10
    )
    np.testing.assert_array_equal(labels[0], [0] * 9 + [1] * 10)


def test_more_than_half_unclustered_is_strict():
    # Pixel 12 (second seed) sees both groups: 20 pixels, 10 unclustered (itself included).
    targets = [5] * 10 + [15] * 10
    logits = np.full(20, 3.0)
    logits[5], logits[12] = 5.0, 4.0
    radius = np.full(20, 2.0)
    radius[12] = 12.0
    labels = cluster(row_raw(targets, logits, radius), grid_step(2))
    np.testing.assert_array_equal(labels[0], [1] * 10 + [0] * 10)
    # One more unclustered pixel in its reach: 11 of 21 -> accepted, overwriting object 1.
    labels = cluster(
        row_raw([*targets, 15], np.append(logits, 3.0), np.append(radius, 2.0)), grid_step(2)
    )
    np.testing.assert_array_equal(labels[0], [2] * 21)


def test_seed_thresh_stops():
    targets = [5] * 10 + [15] * 10
    logits = np.full(20, 1.0)  # 0.73: candidates but never seeds at 0.9
    logits[5] = 3.0
    labels = cluster(row_raw(targets, logits, np.full(20, 2.0)), grid_step(2))
    np.testing.assert_array_equal(labels[0], [1] * 10 + [0] * 10)
    assert (
        cluster(row_raw(targets, logits, np.full(20, 2.0)), grid_step(2), seed_thresh=0.99).max()
        == 0
    )
    # A seed exactly at the threshold still starts an object.
    at = float(seed_map(row_raw(targets, logits, np.full(20, 2.0)))[0, 5])
    labels = cluster(row_raw(targets, logits, np.full(20, 2.0)), grid_step(2), seed_thresh=at)
    np.testing.assert_array_equal(labels[0], [1] * 10 + [0] * 10)


def test_empty_and_background():
    raw = torch.zeros(7, 4, 5, 6)
    raw[6] = -5.0
    labels = cluster(raw, grid_step(3))
    assert labels.dtype == np.uint32 and labels.shape == (4, 5, 6) and labels.max() == 0


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.9, 0.7000000000000001, 0.1])
def test_float32_thresholds_compare_as_float64(threshold):
    t32 = np.float32(threshold)
    around = np.array([np.nextafter(t32, np.float32(0)), t32, np.nextafter(t32, np.float32(1))], np.float32)
    wide = around.astype(np.float64)
    np.testing.assert_array_equal(_strictly_above(around, threshold), wide > threshold)
    np.testing.assert_array_equal(_at_least(around, threshold), wide >= threshold)


def test_thresholds_between_float32_values_and_candidate_geometry():
    # Seediness exactly float32(0.6) (> 0.6 in float64): a candidate for fg_thresh=0.6, and it
    # starts an object for seed_thresh=0.6 (0.6000000238 >= 0.6).
    rng = np.random.default_rng(3)
    raw = torch.tensor(rng.normal(scale=0.01, size=(5, 6, 7)), dtype=torch.float32)
    raw[2:4] = -1.0  # small bandwidth
    p = np.float32(0.6)
    raw[4] = float(np.log(p / (1 - p)))
    raw[4, 0, 0] = -5.0
    seed = seed_map(raw)
    step = grid_step(2)
    index, emb, s, seed_c = candidate_geometry(raw, step, fg_thresh=float(seed[1, 1]) - 1e-9)
    wide = seed.astype(np.float64).ravel()
    np.testing.assert_array_equal(index, np.flatnonzero(wide > float(seed[1, 1]) - 1e-9))
    offsets, sigmas, _ = split_raw(raw.double(), 2)
    expected_emb = embeddings(offsets, step).reshape(2, -1)[:, index].T.numpy()
    np.testing.assert_allclose(emb, expected_emb, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(s, bandwidth(sigmas).reshape(2, -1)[:, index].T.numpy())
    np.testing.assert_array_equal(seed_c, wide[index])
    threshold = float(seed[1, 1])  # exactly representable: same either way
    labels = cluster(raw, step, seed_thresh=threshold, fg_thresh=threshold - 1e-9, min_size=1)
    ref, _ = literal_cluster(raw, step, seed_thresh=threshold, fg_thresh=threshold - 1e-9, min_size=1)
    np.testing.assert_array_equal(labels, ref)
    assert labels.max() >= 1


def test_tie_key_orders_equal_seeds_like_candidate_order():
    from embseg.cluster import greedy_labels

    rng = np.random.default_rng(4)
    raw = torch.tensor(rng.normal(scale=0.002, size=(5, 12, 14)), dtype=torch.float32)
    raw[2:4] = 1.2  # radius ~1.7 px: many small objects
    raw[4] = 4.0  # every pixel a seed of equal seediness: only the tie order decides
    index, emb, s, seed = candidate_geometry(raw, grid_step(2))
    plain = greedy_labels(emb, s, seed, grid_step(2), min_size=1)
    perm = rng.permutation(len(index))
    shuffled = greedy_labels(emb[perm], s[perm], seed[perm], grid_step(2), min_size=1, tie_key=index[perm])
    back = np.zeros_like(plain)
    back[perm] = shuffled
    np.testing.assert_array_equal(back, plain)
    assert plain.max() > 1


def test_no_seed_reaches_the_threshold_returns_early():
    raw = torch.zeros(7, 4, 5, 6)
    raw[6] = 1.0  # seediness 0.73: candidates, but no seed at 0.9
    labels, seeds = cluster(raw, grid_step(3), return_seeds=True)
    assert labels.shape == (4, 5, 6) and labels.max() == 0 and seeds.shape == (0,)
    labels = cluster(raw, grid_step(3), seed_thresh=0.7, min_size=1)
    assert labels.max() == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="step"):
        cluster(torch.zeros(5, 4, 4), grid_step(3))
    with pytest.raises(ValueError, match="raw outputs"):
        cluster(torch.zeros(6, 4, 4), grid_step(2))


def test_more_than_65535_objects():
    # 2x2 objects on a pitch of 3 pixels: 265^2 = 70,225 objects.
    n = 265
    size = 3 * n
    idx = np.arange(size)
    inside = (idx % 3) < 2
    centre = (idx // 3) * 3 + 0.5
    raw = np.zeros((5, size, size), np.float32)
    raw[0] = np.arctanh((centre - idx) * H)[:, None]
    raw[1] = np.arctanh((centre - idx) * H)[None, :]
    raw[2:4] = np.log(math.log(2.0) / (1.0 * H) ** 2) / 10
    raw[4] = np.where(inside[:, None] & inside[None, :], 4.0, -4.0)
    labels = cluster(torch.from_numpy(raw), grid_step(2), min_size=4)
    assert labels.dtype == np.uint32
    assert labels.max() == n * n
    assert np.array_equal(np.bincount(labels.ravel())[1:], np.full(n * n, 4))


# ----------------------------------------------------------------------------- real masks


def masks_to_ideal_raw(truth, step):
    """Ideal raw outputs of a real label image: every object pixel embeds at the object pixel
    nearest to the object's mean; seeds high inside objects."""
    ndim = truth.ndim
    step = np.asarray(step)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in truth.shape], indexing="ij")).astype(
        np.float64
    )
    target = grid.copy()
    for k, box in enumerate(ndimage.find_objects(truth), start=1):
        if box is None:
            continue
        inside = truth[box] == k
        points = np.stack([g[box][inside] for g in grid], axis=1)
        centre = points[np.argmin((((points - points.mean(0)) * step) ** 2).sum(1))]
        for d in range(ndim):
            target[d][box][inside] = centre[d]
    offsets = np.arctanh((target - grid) * step.reshape((ndim,) + (1,) * ndim))
    sigmas = np.full((ndim, *truth.shape), math.log(math.log(2.0) / (3.0 * step[-1]) ** 2) / 10)
    logit = np.where(truth > 0, 2.0 + ndimage.distance_transform_edt(truth > 0), -4.0)
    return torch.from_numpy(np.concatenate([offsets, sigmas, logit[None]]).astype(np.float32))


@pytest.mark.parametrize("name", ["dsb_nuclei_2d.tif", "synthetic_nuclei_3d.tif"])
def test_real_masks_ideal_outputs(name):
    truth = tifffile.imread(dataset("stardist_samples") / "test" / "masks" / name).astype(np.int64)
    step = grid_step(truth.ndim)
    raw = masks_to_ideal_raw(truth, step)
    got = cluster(raw, step, min_size=10)
    np.testing.assert_array_equal(got, literal_cluster(raw, step, min_size=10)[0])
    assert got.max() == truth.max()
    assert same_partition(got, truth)


def test_warm_up_in_background_compiles_the_kernels():
    import embseg.cluster_kernel as kernel

    thread = kernel.warm_up_in_background()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert len(kernel._greedy.signatures) >= 1
    assert {str(sig[0]) for sig in kernel.gather.signatures} >= {
        "array(float32, 2d, C)", "array(float64, 2d, C)"}
