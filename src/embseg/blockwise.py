"""Block-wise labels of an in-memory image: memory bounded by the block, not by the image.

The image is cut into blocks (:func:`embseg.distributed.plan_blocks`, the geometry of the
dask route): each block's cluster region (its core grown by ``object_halo``) gets its raw
outputs from one network pass over the region grown by ``context``, is clustered on its own,
and keeps only the objects whose seed lies in its core (:func:`embseg.distributed.owned_objects`).
Those objects are pasted into the label image at once; where objects of two blocks claim the
same pixel, the one later in the greedy clustering's seed order (lower seediness, ties by the
seed's position in C order) wins, the rule of the dask merge. At the end the ids are renumbered
``1..N`` in that seed order, slab by slab.

What is held at a time: the input, the labels (and the seed map when asked for), one block's
raw outputs and the network's activations for it, and per object three numbers. Unlike
:func:`embseg.predict.predict_labels_streamed` (one global clustering of every candidate pixel,
whose memory grows with the foreground) nothing grows with the image but the input and the
output arrays. The price: the object halo is computed by two blocks, and an object farther
than ``object_halo`` from its seed is cut at its block's cluster region (counted, and warned
about). With objects within the halo that do not compete for pixels, the labels equal those of
the global clustering up to the numbering of ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from embseg.allocator import bounded_memory
from embseg.cluster import cluster, seed_map
from embseg.distributed import Block, BlockObjects, owned_objects, plan_blocks
from embseg.predict import TTATransform, _check_args, _inference, _tile_outputs, tta_transforms
from embseg.tiling import Tile

#: Rows (along the first spatial axis) renumbered at a time in the final pass.
_SLAB_PIXELS = 1 << 22


def _as_tile(block: Block) -> Tile:
    """The block as a tile of the prediction machinery: its core is the cluster region."""
    return Tile(
        index=(block.index,), core=block.cluster, read=block.read,
        core_in_read=tuple(slice(c.start - r.start, c.stop - r.start)
                           for c, r in zip(block.cluster, block.read, strict=True)),
        pad=block.pad,
    )


def paste_objects(
    labels: np.ndarray,
    crop: np.ndarray,
    offset: Sequence[int],
    ids: np.ndarray,
    value: np.ndarray,
    flat: np.ndarray,
) -> None:
    """Write a block's objects into ``labels`` in place; overlaps go to the later object.

    Parameters
    ----------
    labels
        Label image holding provisional ids (0 = background).
    crop
        The block's objects, ids ``1..k`` (0 elsewhere), placed at ``offset``.
    offset
        Index in ``labels`` of ``crop``'s first pixel.
    ids
        ``(k,)`` provisional id in ``labels`` of each object of ``crop``.
    value, flat
        Seediness and flat seed index of every provisional id (index 0 unused): an object is
        later in the seed order when its seediness is lower, or equal with a larger index.
    """
    if crop.size == 0:
        return
    box = tuple(slice(int(o), int(o) + n) for o, n in zip(offset, crop.shape, strict=True))
    view = labels[box]
    mask = crop > 0
    new = ids[crop[mask].astype(np.int64) - 1]
    old = view[mask]
    take = old == 0
    clash = ~take
    if clash.any():
        o, n = old[clash].astype(np.int64), new[clash]
        take[clash] = (value[n] < value[o]) | ((value[n] == value[o]) & (flat[n] > flat[o]))
    old[take] = new[take]
    view[mask] = old


@bounded_memory()  # a memory-bounded route: glibc's malloc thresholds (embseg.allocator)
def predict_labels_blockwise(
    net: torch.nn.Module,
    image: np.ndarray,
    ndim: int,
    step: Sequence[float],
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_size: int = 10,
    block_shape: int | Sequence[int] = 256,
    object_halo: int | Sequence[int] = 32,
    context: int | Sequence[int] = 0,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    return_seeds: bool = False,
    max_radius: Sequence[float] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels of an image block by block (see the module docstring).

    Parameters
    ----------
    net, image, ndim, step, tta, device, amp, batch_size, progress
        As for :func:`embseg.predict.predict_raw`; ``image`` is channel-first and normalised.
    seed_thresh, fg_thresh, min_size, max_radius
        As for :func:`embseg.cluster.cluster`.
    block_shape
        Core shape per axis (one int for all), rounded up to a multiple of 8.
    object_halo
        Largest distance (pixels per axis) from an object's seed to its farthest pixel.
    context
        Network context read around each cluster region (``Model.halo()``).
    return_seeds
        Also return the seed map.

    Returns
    -------
    labels : numpy.ndarray
        ``uint32`` labels, ids ``1..N`` in the greedy seed order.
    seed : numpy.ndarray, optional
        ``float32`` seediness, when ``return_seeds``.
    """
    spatial = tuple(int(n) for n in image.shape[1:])
    if len(spatial) != ndim or len(step) != ndim:
        raise ValueError(f"image of shape {image.shape} and step {list(step)} for {ndim} spatial axes")
    blocks = plan_blocks(spatial, block_shape, object_halo, context)
    merged = _Merge(spatial)
    seeds = np.zeros(spatial, dtype=np.float32) if return_seeds else None
    device, batch_size, channels_last = _check_args(image, ndim, device, batch_size, None)
    transforms = tta_transforms(ndim) if tta else [TTATransform(ndim)]
    with _inference(net, device, amp, ndim, channels_last) as run:
        outputs = _tile_outputs(run, image, [_as_tile(b) for b in blocks], transforms, batch_size, device,
                                progress, channels_last)
        for block, (_, raw) in zip(blocks, outputs, strict=True):
            seediness = seed_map(raw)
            if seeds is not None:
                core = tuple(slice(c.start - r.start, c.stop - r.start)
                             for c, r in zip(block.core, block.cluster, strict=True))
                seeds[block.core] = seediness[core]
            local, local_seeds = cluster(raw, step, seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                                         min_size=min_size, origin=[s.start for s in block.cluster],
                                         return_seeds=True, max_radius=max_radius)
            del raw
            merged.add(owned_objects(local, local_seeds, seediness, block, spatial))
    if merged.n_cut:
        warnings.warn(f"{merged.n_cut} object(s) reach the edge of their block's halo and may be cut; "
                      f"raise the object halo (now {object_halo})", stacklevel=2)
    labels = merged.finish()
    return (labels, seeds) if return_seeds else labels


class _Merge:
    """The label image being assembled: provisional ids in paste order, and per id the
    seediness and flat seed index that order them (index 0 unused)."""

    def __init__(self, spatial: tuple[int, ...]) -> None:
        self.spatial = spatial
        self.labels = np.zeros(spatial, dtype=np.uint32)
        self.value = np.zeros(1, np.float64)
        self.flat = np.zeros(1, np.int64)
        self.n_cut = 0

    def add(self, objects: BlockObjects) -> None:
        """Paste the objects one block owns."""
        k = objects.seed_value.size
        if k == 0:
            return
        ids = np.arange(self.value.size, self.value.size + k, dtype=np.int64)
        self.value = np.concatenate([self.value, objects.seed_value.astype(np.float64)])
        self.flat = np.concatenate([
            self.flat, np.ravel_multi_index(tuple(objects.seed_position.T), self.spatial).astype(np.int64),
        ])
        paste_objects(self.labels, objects.labels, objects.offset, ids, self.value, self.flat)
        self.n_cut += int(objects.cut.sum())

    def finish(self) -> np.ndarray:
        """The labels with ids ``1..N`` in seed order."""
        if self.value.size > 1:
            _renumber(self.labels, self.value, self.flat)
        return self.labels


def _slabs(shape: Sequence[int]) -> list[slice]:
    per_row = max(1, int(np.prod(shape[1:])))
    rows = max(1, _SLAB_PIXELS // per_row)
    return [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]


def _renumber(labels: np.ndarray, value: np.ndarray, flat: np.ndarray) -> None:
    """Provisional ids -> ``1..N`` by seed order, dropping ids no pixel kept; in place, by slabs."""
    counts = np.zeros(value.size, dtype=np.int64)
    for rows in _slabs(labels.shape):
        counts += np.bincount(labels[rows].ravel(), minlength=value.size)
    kept = np.flatnonzero(counts[1:]) + 1
    kept = kept[np.lexsort((flat[kept], -value[kept]))]
    lut = np.zeros(value.size, dtype=labels.dtype)
    lut[kept] = np.arange(1, kept.size + 1, dtype=labels.dtype)
    for rows in _slabs(labels.shape):
        labels[rows] = lut[labels[rows]]
