"""Tile geometry for tiled and block-wise prediction, N-D.

An image is cut into non-overlapping *cores* that partition it. Each core is read with a
*halo* of context on every side; where the halo leaves the image, the missing part is recorded
as padding (``Tile.pad``) and filled by reflection. With a halo at least the network's
receptive field, the raw outputs on the core equal those of a whole-image forward of the image
reflect-padded by the same halo, so cores are written as they come and nothing is blended.

Core boundaries can be aligned to a multiple (the network stride, 8), so that every tile sees
the same down-sampling phase as the whole image does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile of a grid.

    Attributes
    ----------
    index
        Position of the tile in the grid, per axis.
    core
        Slices of the core in image coordinates; the cores of a grid partition the image.
    read
        Slices of the region to read: the core expanded by the halo, clipped to the image.
    core_in_read
        Slices of the core within the read region.
    pad
        Per axis ``(before, after)``: how far the halo reaches beyond the image border.
    """

    index: tuple[int, ...]
    core: tuple[slice, ...]
    read: tuple[slice, ...]
    core_in_read: tuple[slice, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def core_shape(self) -> tuple[int, ...]:
        """Shape of the core."""
        return tuple(s.stop - s.start for s in self.core)

    @property
    def core_in_padded(self) -> tuple[slice, ...]:
        """Slices of the core within the read region padded by ``pad``."""
        return tuple(
            slice(s.start + before, s.stop + before)
            for s, (before, _) in zip(self.core_in_read, self.pad, strict=True)
        )


def per_axis(value: int | Sequence[int], ndim: int, name: str = "value") -> tuple[int, ...]:
    """An int or a sequence of ``ndim`` ints as a tuple of ``ndim`` ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"{name} has {len(out)} entries for {ndim} axes")
    return out


def axis_boundaries(size: int, tile: int, align: int = 1, balanced: bool = False) -> list[int]:
    """Core boundaries ``[0, b1, ..., size]`` along one axis.

    Parameters
    ----------
    size
        Length of the axis.
    tile
        Largest core length wanted (a core is longer only if ``tile < align``).
    align
        Inner boundaries are multiples of this.
    balanced
        If True, cores have nearly equal lengths (the last one possibly shorter, by less than
        ``align``); otherwise cores are ``tile`` rounded up to ``align`` long, the last one takes
        the rest.
    """
    if size < 1 or tile < 1 or align < 1:
        raise ValueError(f"size, tile and align must be positive, got {size}, {tile}, {align}")
    length = math.ceil(tile / align) * align
    if balanced:
        n = math.ceil(size / length)
        length = math.ceil(size / n / align) * align
    n = math.ceil(size / length)
    return [min(i * length, size) for i in range(n + 1)]


def tile_grid(
    shape: Sequence[int],
    tile_shape: int | Sequence[int],
    halo: int | Sequence[int],
    align: int | Sequence[int] = 1,
    balanced: bool = False,
) -> list[Tile]:
    """Tiles whose cores partition an image of ``shape``, in C order of their grid index.

    Parameters
    ----------
    shape
        Spatial shape of the image.
    tile_shape
        Core shape per axis (or one int for all axes), see :func:`axis_boundaries`.
    halo
        Context added on each side of a core, per axis or one int.
    align
        Core boundaries are multiples of this (per axis or one int).
    balanced
        Nearly equal cores instead of full cores and a remainder.

    Returns
    -------
    list of Tile

    Examples
    --------
    >>> [t.core for t in tile_grid((10,), 4, 1)]
    [(slice(0, 4, None),), (slice(4, 8, None),), (slice(8, 10, None),)]
    >>> tile_grid((10,), 4, 1)[0].read, tile_grid((10,), 4, 1)[0].pad
    ((slice(0, 5, None),), ((1, 0),))
    """
    ndim = len(shape)
    tile_shape = per_axis(tile_shape, ndim, "tile_shape")
    halo = per_axis(halo, ndim, "halo")
    align = per_axis(align, ndim, "align")
    if any(h < 0 for h in halo):
        raise ValueError(f"halo must be >= 0, got {halo}")
    bounds = [
        axis_boundaries(n, t, a, balanced) for n, t, a in zip(shape, tile_shape, align, strict=True)
    ]
    tiles = []
    for index in np.ndindex(*[len(b) - 1 for b in bounds]):
        core, read, core_in_read, pad = [], [], [], []
        for d, i in enumerate(index):
            start, stop = bounds[d][i], bounds[d][i + 1]
            lo, hi = start - halo[d], stop + halo[d]
            read_lo, read_hi = max(lo, 0), min(hi, shape[d])
            core.append(slice(start, stop))
            read.append(slice(read_lo, read_hi))
            core_in_read.append(slice(start - read_lo, stop - read_lo))
            pad.append((read_lo - lo, hi - read_hi))
        tiles.append(
            Tile(
                tuple(int(i) for i in index),
                tuple(core),
                tuple(read),
                tuple(core_in_read),
                tuple(pad),
            )
        )
    return tiles


def pad_to_multiple(
    array: np.ndarray,
    multiple: int | Sequence[int] = 8,
    mode: str = "reflect",
    ndim: int | None = None,
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the last ``ndim`` axes at their end to a multiple of ``multiple``.

    Parameters
    ----------
    array
        Array ``(..., *spatial)``.
    multiple
        Per spatial axis or one int.
    mode
        :func:`numpy.pad` mode. NumPy reflects repeatedly where the padding is longer than
        the axis, and repeats an axis of length 1.
    ndim
        Number of trailing axes to pad (default: all).

    Returns
    -------
    padded : numpy.ndarray
    crop : tuple of slice
        Slices over all axes of ``padded`` that recover ``array``.

    Examples
    --------
    >>> padded, crop = pad_to_multiple(np.arange(5.0), 4)
    >>> padded
    array([0., 1., 2., 3., 4., 3., 2., 1.])
    >>> np.array_equal(padded[crop], np.arange(5.0))
    True
    """
    ndim = array.ndim if ndim is None else ndim
    lead = array.ndim - ndim
    multiple = per_axis(multiple, ndim, "multiple")
    widths = [(0, 0)] * lead + [
        (0, -n % m) for n, m in zip(array.shape[lead:], multiple, strict=True)
    ]
    crop = tuple(slice(0, n) for n in array.shape)
    if not any(after for _, after in widths):
        return array, crop
    return np.pad(array, widths, mode=mode), crop
