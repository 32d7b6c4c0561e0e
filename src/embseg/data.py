"""Training samples: dataset properties, the object table and on-the-fly object-centred crops.

No crop files are written: :class:`TrainingCrops` cuts each sample from in-memory, already
normalised images at ``__getitem__`` time. A sample is an object drawn from all objects of all
images (uniformly by default; ``image_balance`` shifts the draw towards images with few objects)
with a crop around it (random jitter, clipped to the image), or, for a share
``random_crop_fraction`` of the samples, a crop at a uniformly random position. Images smaller
than the crop are padded (image with its per-channel minimum, labels with 0), never dropped.

Centres follow the paper: the centre of an object fully inside the crop is its (cached)
whole-object centre; the centre of an object cut by the crop border is recomputed on its visible
part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from embseg.centers import (
    _check_method,
    center_of,
    centers_in_boxes,
    check_labels,
    object_centers,
    object_slices,
)
from embseg.errors import UserError

#: Foreground weight of the seed loss in 2D (the original's constant).
FG_WEIGHT_2D = 10.0
#: Crop sizes are multiples of this (the network's output stride).
CROP_MULTIPLE = 8
#: Smallest automatic crop in Y and X, and in Z (3D).
MIN_CROP_YX = 64
MIN_CROP_Z = 16
#: Automatic crop per axis: mean + N_SIGMA * std of the objects' bounding-box extents.
N_SIGMA = 5.0


def round_up(value: float, multiple: int = CROP_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value`` (and ``>= multiple``)."""
    return max(multiple, math.ceil(value / multiple - 1e-9) * multiple)


def _compact_mask(mask: np.ndarray) -> np.ndarray:
    """Validated label image whose ids are small enough for lookup tables (``bincount``).

    Masks with huge or 64-bit unsigned ids are relabelled sequentially (int32); ids only matter
    within a sample, which is relabelled anyway.
    """
    mask = check_labels(mask)
    if mask.size == 0:
        raise UserError("empty mask")
    top = int(mask.max())
    if mask.dtype == np.uint64 or top > 2 * mask.size + 65536 or top > np.iinfo(np.int32).max:
        values, inverse = np.unique(mask, return_inverse=True)
        inverse = inverse.reshape(mask.shape).astype(np.int32)
        if values[0] != 0:
            inverse += 1
        return inverse
    return mask


def _object_stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ids, bbox starts ``(k, D)``, bbox stops ``(k, D)`` and pixel counts of a compact mask."""
    ids, slices = object_slices(mask)
    ndim = mask.ndim
    if len(ids) == 0:
        empty = np.zeros((0, ndim), dtype=np.int64)
        return ids, empty, empty.copy(), np.zeros(0, dtype=np.int64)
    starts = np.array([[s.start for s in box] for box in slices], dtype=np.int64)
    stops = np.array([[s.stop for s in box] for box in slices], dtype=np.int64)
    sizes = np.bincount(mask.ravel(), minlength=int(ids[-1]) + 1)[ids].astype(np.int64)
    return ids, starts, stops, sizes


def _check_masks(masks: Sequence[np.ndarray], ndim: int) -> list[np.ndarray]:
    if ndim not in (2, 3):
        raise UserError(f"ndim must be 2 or 3, got {ndim}")
    if len(masks) == 0:
        raise UserError("no masks given")
    out = []
    for k, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.ndim != ndim:
            raise UserError(f"mask {k} has {mask.ndim} axes, expected {ndim} (shape {mask.shape})")
        out.append(_compact_mask(mask))
    return out


def dataset_properties(masks: Sequence[np.ndarray], ndim: int) -> dict[str, Any]:
    """Data-derived training settings from the training masks.

    Parameters
    ----------
    masks
        Instance label images ``(*spatial)``.
    ndim
        Number of spatial axes (2 or 3).

    Returns
    -------
    dict
        * ``crop_size``: per axis, ``mean + 5 std`` of the objects' bounding-box extents
          (``max - min`` of the object's coordinates, as the original measured them; this gives
          96 for DSB2018 and 248 for Usiigaci), rounded up to a multiple of 8 but not beyond the
          largest mask (rounded up to 8), then at least 64 in Y and X (Y and X made equal, the
          larger of the two) and at least 16 in Z.
        * ``fg_weight``: 10 in 2D; in 3D the mean over masks of ``#background / #foreground``.
        * ``min_object_size``, ``max_object_size``, ``mean_object_size`` (pixels),
          ``n_objects``, ``extent_mean``, ``extent_std`` (per axis, ``max - min``), ``ndim``.

    Examples
    --------
    >>> mask = np.zeros((100, 100), np.uint16); mask[10:20, 10:30] = 1
    >>> props = dataset_properties([mask], ndim=2)
    >>> props["crop_size"], props["fg_weight"], props["min_object_size"]
    ((64, 64), 10.0, 200)
    """
    masks = _check_masks(masks, ndim)
    extents, sizes, ratios = [], [], []
    for mask in masks:
        _, starts, stops, counts = _object_stats(mask)
        # extent as the original measured it: last minus first coordinate (span - 1)
        extents.append(stops - starts - 1)
        sizes.append(counts)
        n_fg = int(counts.sum())
        if n_fg:
            ratios.append((mask.size - n_fg) / n_fg)
    extent = np.concatenate(extents)
    size = np.concatenate(sizes)
    if len(size) == 0:
        raise UserError("the training masks contain no objects")
    mean = extent.mean(axis=0)
    std = extent.std(axis=0)
    largest = np.max([m.shape for m in masks], axis=0)
    crop = [
        min(round_up(m + N_SIGMA * s), round_up(big))
        for m, s, big in zip(mean, std, largest, strict=True)
    ]
    yx = max(MIN_CROP_YX, crop[-1], crop[-2])
    crop[-2:] = [yx, yx]
    if ndim == 3:
        crop[0] = max(MIN_CROP_Z, crop[0])
    return {
        "ndim": ndim,
        "crop_size": tuple(int(c) for c in crop),
        "fg_weight": FG_WEIGHT_2D if ndim == 2 else float(np.mean(ratios)),
        "n_objects": len(size),
        "min_object_size": int(size.min()),
        "max_object_size": int(size.max()),
        "mean_object_size": float(size.mean()),
        "extent_mean": [float(v) for v in mean],
        "extent_std": [float(v) for v in std],
    }


class ObjectTable:
    """All objects of a list of label images: image index, id, bounding box, size and a lazily
    computed, cached whole-object centre.

    Parameters
    ----------
    masks
        Instance label images ``(*spatial)`` (all with the same number of axes).
    center_method
        ``"medoid"``, ``"approximate_medoid"`` or ``"centroid"``.
    spacing
        Physical pixel size per axis for the centre distances (e.g. ``(anisotropy, 1, 1)``).

    Attributes
    ----------
    image_index, ids, sizes : numpy.ndarray
        ``(n,)`` int64 per object.
    starts, stops : numpy.ndarray
        ``(n, D)`` int64 bounding boxes (``stop`` exclusive).
    """

    def __init__(
        self,
        masks: Sequence[np.ndarray],
        center_method: str = "medoid",
        spacing: Sequence[float] | None = None,
    ) -> None:
        self.masks = [_compact_mask(np.asarray(m)) for m in masks]
        self.center_method = _check_method(center_method)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.ndim = self.masks[0].ndim if self.masks else 0
        index, ids, starts, stops, sizes, rows = [], [], [], [], [], []
        total = 0
        for k, mask in enumerate(self.masks):
            if mask.ndim != self.ndim:
                raise UserError(f"mask {k} has {mask.ndim} axes, the first has {self.ndim}")
            obj_ids, obj_starts, obj_stops, obj_sizes = _object_stats(mask)
            lookup = np.full(int(obj_ids[-1]) + 1 if len(obj_ids) else 1, -1, dtype=np.int64)
            lookup[obj_ids] = np.arange(total, total + len(obj_ids))
            total += len(obj_ids)
            index.append(np.full(len(obj_ids), k, dtype=np.int64))
            ids.append(obj_ids)
            starts.append(obj_starts)
            stops.append(obj_stops)
            sizes.append(obj_sizes)
            rows.append(lookup)
        empty = np.zeros((0, self.ndim), dtype=np.int64)
        self.image_index = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate(starts) if starts else empty
        self.stops = np.concatenate(stops) if stops else empty
        self.sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        #: per image, id -> row of the table (-1 for absent ids)
        self.row_of = rows
        self._centers = np.zeros((len(self.ids), self.ndim), dtype=np.int64)
        self._known = np.zeros(len(self.ids), dtype=bool)

    def __len__(self) -> int:
        return len(self.ids)

    def slices(self, row: int) -> tuple[slice, ...]:
        """Bounding box of object ``row`` as slices into its mask."""
        return tuple(
            slice(int(a), int(b)) for a, b in zip(self.starts[row], self.stops[row], strict=True)
        )

    def coords(self, row: int) -> np.ndarray:
        """Pixel coordinates ``(n, D)`` of object ``row`` in its image."""
        box = self.slices(row)
        mask = self.masks[self.image_index[row]]
        return np.argwhere(mask[box] == self.ids[row]) + self.starts[row]

    def center(self, row: int) -> np.ndarray:
        """Whole-object centre ``(D,)`` of object ``row`` in image coordinates (cached)."""
        if not self._known[row]:
            self._centers[row] = center_of(self.coords(row), self.center_method, self.spacing)
            self._known[row] = True
        return self._centers[row]

    def precompute_centers(self) -> None:
        """Compute all centres now (e.g. before forking data-loader workers): one
        :func:`embseg.centers.object_centers` call per image (its medoids are batched FFTs)."""
        for k in np.unique(self.image_index[~self._known]):
            centers = object_centers(self.masks[k], self.center_method, self.spacing)
            rows = np.flatnonzero((self.image_index == k) & ~self._known)
            self._centers[rows] = [centers[int(i)] for i in self.ids[rows]]
            self._known[rows] = True

    def crop_centers(self, image_index: int, origin: Sequence[int], mask_crop: np.ndarray,
                     present: np.ndarray) -> np.ndarray:
        """Centres ``(K, D)``, in crop coordinates, of the objects ``present`` in a crop.

        An object wholly inside the crop keeps its whole-object centre (cached, computed once
        per object however many crops hold it); an object cut by the crop border gets the
        centre of its visible part (``mask_crop``, the crop of image ``image_index`` at
        ``origin``).
        """
        origin = np.asarray(origin, dtype=np.int64)
        crop = np.array(mask_crop.shape)
        rows = self.row_of[image_index][present]
        starts, stops = self.starts[rows], self.stops[rows]
        inside = np.all(starts >= origin, axis=1) & np.all(stops <= origin + crop, axis=1)
        centers = np.empty((len(present), self.ndim), dtype=np.int64)
        for k in np.flatnonzero(inside):
            centers[k] = self.center(int(rows[k])) - origin
        cut = np.flatnonzero(~inside)
        if len(cut):  # the visible parts of all cut objects at once (batched medoids)
            # Each visible part lies in its object's box clipped to the crop.
            lo = np.maximum(starts[cut], origin) - origin
            hi = np.minimum(stops[cut], origin + crop) - origin
            boxes = [tuple(slice(int(a), int(b)) for a, b in zip(lo_k, hi_k, strict=True))
                     for lo_k, hi_k in zip(lo, hi, strict=True)]
            found = centers_in_boxes(mask_crop, present[cut], boxes, self.center_method, self.spacing)
            for k in cut:
                centers[k] = found[int(present[k])]
        return centers


def random_dihedral(
    ndim: int, rng: np.random.Generator, square_yx: bool = True
) -> list[tuple[str, int, tuple[int, ...]]]:
    """A uniformly drawn element of the augmentation group, as operations on spatial axes.

    2D: the 8-element dihedral group of the square, ``rot90`` by ``k`` in YX (``k`` uniform in
    0..3) then a flip along X with p = 0.5. 3D: the 16-element group of YX rotations and
    reflections times an optional flip along Z (Z never swaps with Y or X): the same, then a flip
    along Z with p = 0.5. This is the group the original's recipe (a YX rotation or a 180 degree
    ZY/ZX rotation, then a flip along a random axis) generates, drawn uniformly instead (that
    recipe reaches 14 of the 16 elements, with unequal odds). When Y and X differ in size
    (``square_yx=False``) YX rotations are limited to 0 and 180 degrees, which keeps the shape.

    Returns
    -------
    list
        ``("rot90", k, (axis_a, axis_b))`` and ``("flip", 0, (axis,))`` operations.
    """
    if ndim not in (2, 3):
        raise UserError(f"ndim must be 2 or 3, got {ndim}")
    y, x = ndim - 2, ndim - 1
    k = int(rng.integers(4)) if square_yx else 2 * int(rng.integers(2))
    ops: list[tuple[str, int, tuple[int, ...]]] = [("rot90", k, (y, x))]
    if rng.random() < 0.5:
        ops.append(("flip", 0, (x,)))
    if ndim == 3 and rng.random() < 0.5:
        ops.append(("flip", 0, (0,)))
    return ops


def apply_dihedral(
    array: np.ndarray, ops: list[tuple[str, int, tuple[int, ...]]], n_leading: int = 0
) -> np.ndarray:
    """Apply :func:`random_dihedral` operations to the spatial axes of ``array`` (a view).

    ``n_leading`` is the number of non-spatial leading axes (1 for a channel-first image).
    """
    for name, k, axes in ops:
        shifted = tuple(a + n_leading for a in axes)
        if name == "rot90":
            if k % 4:
                array = np.rot90(array, k, axes=shifted)
        else:
            array = np.flip(array, axis=shifted[0])
    return array


def _object_cdf(image_index: np.ndarray, n_images: int, balance: float) -> np.ndarray | None:
    """Cumulative draw probabilities of the object rows, ``n_image ** -balance`` each.

    ``None`` for ``balance == 0`` (uniform over objects, drawn with ``rng.integers``).
    """
    if balance == 0.0 or image_index.size == 0:
        return None
    counts = np.bincount(image_index, minlength=n_images).astype(np.float64)
    weights = counts[image_index] ** -balance
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


class TrainingCrops(Dataset):
    """Object-centred training crops cut on the fly, with dihedral augmentation.

    Parameters
    ----------
    images
        Normalised float32 images ``(C, *spatial)``.
    masks
        Instance label images ``(*spatial)``, same spatial shapes.
    crop_size
        Crop shape per spatial axis.
    samples_per_epoch
        Length of the dataset (samples are drawn with replacement).
    random_crop_fraction
        Share of samples placed uniformly at random (image chosen with probability proportional
        to its number of pixels) instead of around an object.
    augment
        Apply a random dihedral transform (see :func:`random_dihedral`).
    center_method
        ``"medoid"`` (default), ``"approximate_medoid"`` or ``"centroid"``.
    spacing
        Physical pixel size per axis for medoid distances (3D: ``(anisotropy, 1, 1)``).
    seed
        A sample depends only on ``(seed, epoch, index)``; see :meth:`set_epoch`.
    jitter
        Random shift of an object-centred crop, as a fraction of the free room: 0 centres the
        crop on the object's bounding box, 1 places the box anywhere inside the crop (objects
        larger than the crop: the crop anywhere inside the box).
    image_balance
        How object-centred samples share out over images: an object of an image with ``n``
        objects is drawn with probability proportional to ``n ** -image_balance``. 0 (default)
        draws every object equally often, so images with many objects get most crops; 1 gives
        every image (with objects) the same share; 0.5 sits between (an image's share grows
        as ``sqrt(n)``).
    intensity_augment
        Strength ``s`` of a random intensity change per sample (0 = off): the crop's normalised
        intensities become ``x * exp(u * s) + v * s / 2`` with ``u, v`` uniform in ``[-1, 1]``
        (all channels alike), so 0.5 scales by 0.61-1.65 and shifts by up to 0.25. Drawn after
        the dihedral transform, so the geometry of a sample does not depend on it.

    Notes
    -----
    Each sample is a dict with ``"image"`` float32 ``(C, *crop)``, ``"instances"`` int64
    ``(*crop)`` (ids 1..K in order of the original ids, 0 background) and ``"centers"`` int64
    ``(*crop)`` (the instance id at its centre pixel, else 0). The default collate stacks them.
    With the centroid method a centre may fall on another object's pixel.
    In data-loader workers ``set_epoch`` must be called before the workers start (not with
    ``persistent_workers``), and lazily computed centres are cached per worker; call
    ``table.precompute_centers()`` first to share them.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        crop_size: Sequence[int],
        samples_per_epoch: int,
        random_crop_fraction: float = 0.1,
        augment: bool = True,
        center_method: str = "medoid",
        spacing: Sequence[float] | None = None,
        seed: int = 0,
        jitter: float = 0.5,
        image_balance: float = 0.0,
        intensity_augment: float = 0.0,
    ) -> None:
        if len(images) != len(masks):
            raise UserError(f"got {len(images)} images but {len(masks)} masks")
        if len(images) == 0:
            raise UserError("no training images given")
        self.crop_size = tuple(int(c) for c in crop_size)
        ndim = len(self.crop_size)
        if ndim not in (2, 3) or min(self.crop_size) < 1:
            raise UserError(f"crop_size must have 2 or 3 positive values, got {crop_size}")
        if samples_per_epoch < 1:
            raise UserError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        if not 0.0 <= random_crop_fraction <= 1.0:
            raise UserError(f"random_crop_fraction must lie in [0, 1], got {random_crop_fraction}")
        if not 0.0 <= jitter <= 1.0:
            raise UserError(f"jitter must lie in [0, 1], got {jitter}")
        if not 0.0 <= image_balance <= 1.0:
            raise UserError(f"image_balance must lie in [0, 1], got {image_balance}")
        if not 0.0 <= intensity_augment <= 2.0:
            raise UserError(f"intensity_augment must lie in [0, 2], got {intensity_augment}")
        self.images = []
        for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
            image = np.asarray(image, dtype=np.float32)
            mask = np.asarray(mask)
            if image.ndim != ndim + 1 or image.shape[1:] != mask.shape:
                raise UserError(
                    f"image {k} has shape {image.shape}, expected (C, *{mask.shape}) "
                    f"matching its mask with {ndim} spatial axes"
                )
            self.images.append(image)
        self.table = ObjectTable(masks, center_method=center_method, spacing=spacing)
        if self.table.ndim != ndim:
            raise UserError(f"masks have {self.table.ndim} axes, crop_size has {ndim}")
        if len(self.table) == 0 and random_crop_fraction < 1.0:
            raise UserError("the training masks contain no objects")
        self.masks = self.table.masks
        self.ndim = ndim
        self.samples_per_epoch = int(samples_per_epoch)
        self.random_crop_fraction = float(random_crop_fraction)
        self.augment = bool(augment)
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.epoch = 0
        self.pad_values = [
            image.reshape(image.shape[0], -1).min(axis=1).reshape((-1,) + (1,) * ndim)
            for image in self.images
        ]
        pixels = np.array([m.size for m in self.masks], dtype=np.float64)
        self._image_weights = pixels / pixels.sum()
        self.image_balance = float(image_balance)
        self.intensity_augment = float(intensity_augment)
        self._object_cdf = _object_cdf(self.table.image_index, len(self.masks), self.image_balance)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: samples differ between epochs and repeat for the same epoch."""
        self.epoch = int(epoch)

    # -- sampling ---------------------------------------------------------------------------

    def _origin(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """Image index and crop origin (may be negative or overhang where the image is small)."""
        crop = np.array(self.crop_size)
        if len(self.table) == 0 or rng.random() < self.random_crop_fraction:
            image = int(rng.choice(len(self.masks), p=self._image_weights))
            shape = np.array(self.masks[image].shape)
            low = np.minimum(0, shape - crop)
            high = np.maximum(0, shape - crop)
            return image, low + np.floor(rng.random(self.ndim) * (high - low + 1)).astype(np.int64)
        if self._object_cdf is None:
            row = int(rng.integers(len(self.table)))
        else:
            row = min(int(np.searchsorted(self._object_cdf, rng.random(), side="right")),
                      len(self.table) - 1)
        image = int(self.table.image_index[row])
        shape = np.array(self.masks[image].shape)
        start, stop = self.table.starts[row], self.table.stops[row]
        free = crop - (stop - start)
        # centred origin (floor of half the free room), shifted by a uniform jitter
        centred = start - np.floor_divide(free, 2)
        reach = np.floor(self.jitter * np.abs(free) / 2.0).astype(np.int64)
        origin = (
            centred + np.floor(rng.random(self.ndim) * (2 * reach + 1)).astype(np.int64) - reach
        )
        return image, np.clip(origin, np.minimum(0, shape - crop), np.maximum(0, shape - crop))

    def _cut(self, image_index: int, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image and label crops at ``origin``, padded where the crop leaves the image."""
        image, mask = self.images[image_index], self.masks[image_index]
        shape = np.array(mask.shape)
        crop = np.array(self.crop_size)
        src_lo = np.maximum(origin, 0)
        src_hi = np.minimum(origin + crop, shape)
        src = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi, strict=True))
        if np.all(origin >= 0) and np.all(origin + crop <= shape):
            return image[(slice(None), *src)], mask[src]
        dst = tuple(
            slice(int(a), int(b)) for a, b in zip(src_lo - origin, src_hi - origin, strict=True)
        )
        image_crop = np.empty((image.shape[0], *self.crop_size), dtype=np.float32)
        image_crop[...] = self.pad_values[image_index]
        image_crop[(slice(None), *dst)] = image[(slice(None), *src)]
        mask_crop = np.zeros(self.crop_size, dtype=mask.dtype)
        mask_crop[dst] = mask[src]
        return image_crop, mask_crop

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        image_index, origin = self._origin(rng)
        image_crop, mask_crop = self._cut(image_index, origin)
        counts = np.bincount(mask_crop.ravel())
        counts[0] = 0
        present = np.flatnonzero(counts)
        lookup = np.zeros(len(counts), dtype=np.int64)
        lookup[present] = np.arange(1, len(present) + 1)
        instances = lookup[mask_crop]
        centers_image = np.zeros(self.crop_size, dtype=np.int64)
        if len(present):
            centers = self.table.crop_centers(image_index, origin, mask_crop, present)
            centers_image[tuple(centers.T)] = np.arange(1, len(present) + 1)
        if self.augment:
            ops = random_dihedral(self.ndim, rng, self.crop_size[-1] == self.crop_size[-2])
            image_crop = apply_dihedral(image_crop, ops, n_leading=1)
            instances = apply_dihedral(instances, ops)
            centers_image = apply_dihedral(centers_image, ops)
        image_out = np.ascontiguousarray(image_crop)
        if self.intensity_augment > 0:
            u, v = rng.uniform(-1.0, 1.0, 2)
            strength = self.intensity_augment
            image_out = image_out * np.float32(math.exp(u * strength)) + np.float32(v * strength / 2)
        elif np.may_share_memory(image_out, self.images[image_index]):
            image_out = image_out.copy()
        return {
            "image": torch.from_numpy(image_out),
            "instances": torch.from_numpy(np.ascontiguousarray(instances)),
            "centers": torch.from_numpy(np.ascontiguousarray(centers_image)),
        }
