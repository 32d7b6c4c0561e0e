"""Tile geometry: cores partition the image, reads are cores plus halo, padding helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embseg.tiling import axis_boundaries, pad_to_multiple, per_axis, tile_grid


@st.composite
def grids(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    tile_shape = tuple(draw(st.lists(st.integers(1, 24), min_size=ndim, max_size=ndim)))
    halo = tuple(draw(st.lists(st.integers(0, 12), min_size=ndim, max_size=ndim)))
    align = draw(st.sampled_from([1, 2, 8]))
    balanced = draw(st.booleans())
    return shape, tile_shape, halo, align, balanced


@settings(max_examples=60, deadline=None)
@given(grids())
def test_cores_partition_and_reads_are_clipped_halos(grid):
    shape, tile_shape, halo, align, balanced = grid
    tiles = tile_grid(shape, tile_shape, halo, align=align, balanced=balanced)
    count = np.zeros(shape, np.int64)
    for tile in tiles:
        count[tile.core] += 1
        for d, (core, read, inner, (before, after)) in enumerate(
            zip(tile.core, tile.read, tile.core_in_read, tile.pad, strict=True)
        ):
            assert core.stop > core.start
            assert read.start == max(core.start - halo[d], 0)
            assert read.stop == min(core.stop + halo[d], shape[d])
            assert (inner.start + read.start, inner.stop + read.start) == (core.start, core.stop)
            assert before == max(halo[d] - core.start, 0)
            assert after == max(core.stop + halo[d] - shape[d], 0)
            # Read region plus padding = core with the full halo on both sides.
            assert before + (read.stop - read.start) + after == core.stop - core.start + 2 * halo[d]
            if core.start > 0:
                assert core.start % align == 0
            assert core.stop - core.start <= -(-tile_shape[d] // align) * align
        padded_core = tile.core_in_padded
        assert all(s.start == halo[d] for d, s in enumerate(padded_core))
        assert tile.core_shape == tuple(s.stop - s.start for s in padded_core)
    np.testing.assert_array_equal(count, 1)
    assert [t.index for t in tiles] == sorted(t.index for t in tiles)


def test_regular_grid_example():
    tiles = tile_grid((10, 7), (4, 7), 2)
    assert [t.core for t in tiles] == [
        (slice(0, 4), slice(0, 7)),
        (slice(4, 8), slice(0, 7)),
        (slice(8, 10), slice(0, 7)),
    ]
    assert tiles[1].read == (slice(2, 10), slice(0, 7))
    assert tiles[1].pad == ((0, 0), (2, 2))
    assert tiles[2].read == (slice(6, 10), slice(0, 7))
    assert tiles[2].core_in_read == (slice(2, 4), slice(0, 7))
    assert tiles[2].pad == ((0, 2), (2, 2))


def test_balanced_and_aligned_boundaries():
    assert axis_boundaries(100, 48, align=8, balanced=True) == [0, 40, 80, 100]
    assert axis_boundaries(100, 48, align=8, balanced=False) == [0, 48, 96, 100]
    assert axis_boundaries(100, 45, align=8) == [0, 48, 96, 100]
    assert axis_boundaries(9, 8, align=8, balanced=True) == [0, 8, 9]
    assert axis_boundaries(10, 100) == [0, 10]
    with pytest.raises(ValueError):
        axis_boundaries(0, 4)


def test_per_axis():
    assert per_axis(3, 2) == (3, 3)
    assert per_axis((1, 2, 3), 3) == (1, 2, 3)
    with pytest.raises(ValueError, match="halo"):
        per_axis((1, 2), 3, "halo")
    with pytest.raises(ValueError):
        tile_grid((8, 8), 4, -1)


def test_pad_to_multiple():
    a = np.arange(2 * 5 * 9, dtype=np.float32).reshape(2, 5, 9)
    padded, crop = pad_to_multiple(a, 8, ndim=2)
    assert padded.shape == (2, 8, 16)
    np.testing.assert_array_equal(padded[crop], a)
    # Reflection about the last row/column (not repeating it).
    np.testing.assert_array_equal(padded[:, 5, :9], a[:, 3])
    np.testing.assert_array_equal(padded[:, :5, 9], a[:, :, 7])
    # Already a multiple: returned as is.
    b = np.zeros((3, 8, 16))
    assert pad_to_multiple(b, 8, ndim=2)[0] is b
    # Per-axis multiples, an axis of length 1, constant mode.
    c = np.ones((1, 3))
    padded, crop = pad_to_multiple(c, (4, 2), mode="constant")
    assert padded.shape == (4, 4)
    assert padded.sum() == 3
    padded, _ = pad_to_multiple(c, 4)
    np.testing.assert_array_equal(padded, 1)
