"""Image to raw outputs to labels: tiles, forward passes (with test-time augmentation), clustering.

Raw outputs (offsets, raw sigmas, seed logits) are translation-equivariant, so tiles are
stitched as raw outputs and coordinates are added once, globally, by the clustering.

Every tile is read with its halo; where the halo leaves the image it is filled by reflection,
as if the whole image had been reflect-padded by the halo. Each tile is then padded at its end
to a multiple of the network stride (8) and its core boundaries are multiples of 8, so a tile
sees what a whole-image forward sees: with a halo at least the receptive field, tiled outputs
equal whole-image outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from embseg.allocator import bounded_memory, reuse_freed_memory
from embseg.cluster import _at_least, _candidates, _geometry, cluster, greedy_labels, seed_map
from embseg.embedding import n_output_channels
from embseg.fold import folded_for_inference
from embseg.net import BranchedERFNet, native_bf16
from embseg.tiling import Tile, pad_to_multiple, tile_grid

#: Output stride of the network: inputs are padded to multiples of it, tiles aligned to it.
NETWORK_STRIDE = 8


@dataclass(frozen=True)
class TTATransform:
    """One test-time augmentation: ``quarter_turns`` rotations by 90 degrees in the YX plane
    (from Y towards X, as :func:`torch.rot90` on the last two axes), then flips.

    Attributes
    ----------
    ndim
        Number of spatial axes.
    quarter_turns
        0 to 3.
    flip_axes
        Spatial axes (0 = first spatial axis) flipped after the rotation.
    """

    ndim: int
    quarter_turns: int = 0
    flip_axes: tuple[int, ...] = ()

    def _flip_dims(self) -> tuple[int, ...]:
        return tuple(a - self.ndim for a in self.flip_axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform images ``(B, C, *spatial)``."""
        if self.quarter_turns % 4:
            x = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        if self.flip_axes:
            x = torch.flip(x, self._flip_dims())
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward` on the spatial axes of ``(B, C, *spatial)`` (channels untouched)."""
        if self.flip_axes:
            x = torch.flip(x, self._flip_dims())
        if self.quarter_turns % 4:
            x = torch.rot90(x, -self.quarter_turns, dims=(-2, -1))
        return x

    def transformed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape after :meth:`forward`."""
        shape = tuple(shape)
        if self.quarter_turns % 2:
            shape = (*shape[:-2], shape[-1], shape[-2])
        return shape

    def vector_matrix(self) -> np.ndarray:
        """Signed permutation ``A`` (``D x D``, array-axis order) with ``v_transformed = A v``.

        A quarter turn sends index ``(y, x)`` of an ``(H, W)`` array to ``(W - 1 - x, y)``, so a
        displacement ``(v_y, v_x)`` becomes ``(-v_x, v_y)``; a flip negates its axis.
        """
        y, x = self.ndim - 2, self.ndim - 1
        turn = np.eye(self.ndim, dtype=np.int64)
        turn[[y, x], [y, x]] = 0
        turn[y, x], turn[x, y] = -1, 1
        flip = np.eye(self.ndim, dtype=np.int64)
        for a in self.flip_axes:
            flip[a, a] = -1
        return flip @ np.linalg.matrix_power(turn, self.quarter_turns % 4)

    def inverse_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw outputs ``(B, 2D+1, *spatial)`` of a transformed image back to the original.

        Every channel is moved back spatially; then offsets get ``v = A^T v'`` (tanh is odd, so
        this holds for raw offsets), sigmas the same permutation without signs, the seed
        logit is kept.
        """
        raw = self.inverse(raw)
        a = self.vector_matrix()
        source = np.abs(a).argmax(axis=0)  # v_j = a[source_j, j] * v'_source_j
        signs = a[source, np.arange(self.ndim)]
        if np.array_equal(source, np.arange(self.ndim)) and np.all(signs == 1):
            return raw
        d = self.ndim
        channels = [*source.tolist(), *(source + d).tolist(), 2 * d]
        scale = torch.tensor([*signs.tolist(), *[1] * (d + 1)], dtype=raw.dtype, device=raw.device)
        return raw[:, channels] * scale.view(1, -1, *[1] * d)


def tta_transforms(ndim: int) -> list[TTATransform]:
    """The test-time augmentations, identity first.

    2D: the 8 elements of the dihedral group (4 quarter turns, each with and without a flip of
    Y). 3D: 4 quarter turns in YX times {none, flip Y, flip Z, flip Y and Z} = 16; Z never mixes
    with Y or X.
    """
    if ndim == 2:
        flips = [(), (0,)]
    elif ndim == 3:
        flips = [(), (1,), (0,), (0, 1)]
    else:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return [TTATransform(ndim, k, f) for f in flips for k in range(4)]


def cpu_bf16_supported() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU with native instructions (AMX or
    AVX512-BF16, e.g. Intel Xeon since Sapphire Rapids, AMD Zen 4; not AMD Zen 3)."""
    return native_bf16()


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype mixed precision (``amp``) runs in on ``device``: float16 on CUDA; bfloat16 on
    a CPU that computes it natively (:func:`cpu_bf16_supported`); None (float32) elsewhere."""
    if amp and device.type == "cuda":
        return torch.float16
    if amp and device.type == "cpu" and cpu_bf16_supported():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Autocast to :func:`autocast_dtype` (no context where that is float32)."""
    dtype = autocast_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def default_batch_size(device: torch.device | str) -> int:
    """Inputs per forward pass by device: 1 on the CPU (batching TTA variants was measured
    slower there: larger activations, no gain in arithmetic efficiency), 8 elsewhere."""
    return 1 if torch.device(device).type == "cpu" else 8


def default_channels_last(device: torch.device | str) -> bool:
    """Channels-last activations by device: on the CPU they make the ERFNet forward ~25 %
    faster (oneDNN's preferred layout; measured in benchmarks/RESULTS.md); elsewhere off."""
    return torch.device(device).type == "cpu"


def _tile_input(
    image: np.ndarray, tile: Tile, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """Read region of a tile, reflect-padded by its missing halo and to the network stride."""
    region = np.asarray(image[(slice(None), *tile.read)], dtype=np.float32)
    if any(before or after for before, after in tile.pad):
        region = np.pad(region, [(0, 0), *tile.pad], mode="reflect")
    region, _ = pad_to_multiple(region, NETWORK_STRIDE, ndim=len(tile.read))
    x = torch.from_numpy(np.ascontiguousarray(region))[None].to(device)
    if channels_last:
        x = x.contiguous(memory_format=_memory_format(len(tile.read)))
    return x


def _tile_outputs(
    net: torch.nn.Module,
    image: np.ndarray,
    tiles: Sequence[Tile],
    transforms: Sequence[TTATransform],
    batch_size: int,
    device: torch.device,
    progress: bool,
    channels_last: bool = False,
    copy_cores: bool = True,
) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Raw outputs on each tile core (CPU float32), averaged over ``transforms``.

    Consecutive inputs of equal shape (variants of a tile, or tiles) share one forward pass
    of at most ``batch_size``; only the tiles of the current batch are held in memory. With
    ``copy_cores=False`` the cores are views of the batch's outputs (no copy; for a caller that
    copies each one away before asking for the next).
    """
    ndim = len(tiles[0].core)
    n_channels = n_output_channels(ndim)
    sums: dict[int, list] = {}
    batch: list[tuple[int, TTATransform, torch.Tensor]] = []

    def run_batch() -> list[tuple[Tile, torch.Tensor]]:
        # Finished cores are copied out and the batch's full-size outputs released before
        # they are handed on (what the caller holds next is only the cores).
        x = torch.cat([item[2] for item in batch])
        y = net(x)
        if y.shape != (x.shape[0], n_channels, *x.shape[2:]):
            raise ValueError(
                f"network output {tuple(y.shape)} for input {tuple(x.shape)}; expected {n_channels} channels, same size"
            )
        y = y.float()
        done = []
        for j, (position, transform, _) in enumerate(batch):
            raw = transform.inverse_raw(y[j : j + 1])[0]
            entry = sums[position]
            entry[0] = raw if entry[0] is None else entry[0] + raw
            entry[1] += 1
            del raw
            if entry[1] == len(transforms):
                del sums[position]
                tile = tiles[position]
                mean = entry.pop(0)
                if len(transforms) > 1:
                    mean = mean / len(transforms)
                core = mean[(slice(None), *tile.core_in_padded)]
                done.append((tile, core.contiguous().cpu() if copy_cores else core.cpu()))
                del mean
        batch.clear()
        return done

    for position, tile in enumerate(tqdm(tiles, disable=not progress, desc="tiles", unit="tile")):
        x = _tile_input(image, tile, device, channels_last)
        sums[position] = [None, 0]
        for transform in transforms:
            xt = transform.forward(x)
            if batch and (len(batch) == batch_size or batch[-1][2].shape != xt.shape):
                yield from run_batch()
            batch.append((position, transform, xt))
    if batch:
        yield from run_batch()


def predict_raw(
    net: torch.nn.Module,
    image: np.ndarray,
    ndim: int,
    tile_shape: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    channels_last: bool | None = None,
) -> torch.Tensor:
    """Raw network outputs of an image, tile by tile.

    Parameters
    ----------
    net
        Any module mapping ``(B, C, *S)`` to ``(B, 2*ndim+1, *S)`` for ``S`` multiples of 8.
        A :class:`~embseg.net.BranchedERFNet` runs as an eval-mode copy with its batch norms
        folded into the convolutions (:func:`~embseg.fold.fold_batchnorm`; outputs equal to
        ``net.eval()``'s up to float rounding, ≈1e-6) and is left untouched; any other module is
        moved to ``device`` and put in eval mode (its train/eval mode is restored).
    image
        Normalised image ``(C, *spatial)``; anything NumPy-sliceable (a Zarr array works:
        only the tiles are read).
    ndim
        Number of spatial axes.
    tile_shape
        Largest tile core per axis (one int for all axes); ``None`` = the whole image as one
        tile. Core boundaries are multiples of 8; the network sees at most the core plus twice
        the halo, rounded up to 8.
    halo
        Context read around each core (per axis or one int), at least the network's receptive
        field (``embseg.net.receptive_field_halo``) for tiles to match a whole-image pass.
        Needed with ``tile_shape``; with ``None`` it pads the image borders by reflection.
    tta
        Average the raw outputs over :func:`tta_transforms`.
    device
        Where the network runs; the result is on the CPU.
    amp
        Float16 autocast on CUDA (ignored on other devices).
    batch_size
        Most inputs (tiles or augmented variants) per forward pass; ``None``:
        :func:`default_batch_size` of the device.
    progress
        Show a progress bar over tiles.
    channels_last
        Run the network on channels-last tensors (the folded copy, or the module's parameters
        for the call and then put back); ``None``: :func:`default_channels_last` of the device.
        Changes the outputs only by float rounding (~1e-7).

    Returns
    -------
    torch.Tensor
        ``(2*ndim+1, *spatial)`` float32 on the CPU.
    """
    device, batch_size, channels_last = _check_args(image, ndim, device, batch_size, channels_last)
    reuse_freed_memory()  # freed activations stay in the heap for the next layer / call (embseg.allocator)
    tiles, transforms = _plan(image, ndim, tile_shape, halo, tta)
    spatial = tuple(int(n) for n in image.shape[1:])
    out = torch.empty((n_output_channels(ndim), *spatial), dtype=torch.float32)
    with _inference(net, device, amp, ndim, channels_last) as run:
        for tile, raw in _tile_outputs(
            run, image, tiles, transforms, batch_size, device, progress, channels_last, copy_cores=False
        ):
            out[(slice(None), *tile.core)] = raw  # the one copy of each core
            del raw
    return out


def _plan(
    image: np.ndarray,
    ndim: int,
    tile_shape: int | Sequence[int] | None,
    halo: int | Sequence[int] | None,
    tta: bool,
) -> tuple[list[Tile], list[TTATransform]]:
    """Tiles and TTA variants of a prediction (see :func:`predict_raw`)."""
    spatial = tuple(int(n) for n in image.shape[1:])
    if tile_shape is None:
        tiles = tile_grid(spatial, spatial, 0 if halo is None else halo)
    else:
        if halo is None:
            raise ValueError("tiled prediction needs a halo (the network's receptive field)")
        tiles = tile_grid(spatial, tile_shape, halo, align=NETWORK_STRIDE, balanced=True)
    transforms = tta_transforms(ndim) if tta else [TTATransform(ndim)]
    # Variants of equal shape next to each other, so that they share forward passes.
    return tiles, sorted(transforms, key=lambda t: t.quarter_turns % 2)


@contextlib.contextmanager
def _inference(
    net: torch.nn.Module, device: torch.device, amp: bool, ndim: int, channels_last: bool
) -> Iterator[torch.nn.Module]:
    """The module to run for inference, with inference mode and autocast on.

    A :class:`~embseg.net.BranchedERFNet` runs as its folded copy on ``device`` (optionally
    channels-last; :func:`~embseg.fold.folded_for_inference`, cached while ``net``'s weights
    stay the same); ``net`` itself is not touched. Any other module
    runs itself: moved to ``device``, in eval mode (optionally channels-last), and its mode and
    parameter tensors are restored afterwards.
    """
    if isinstance(net, BranchedERFNet):
        run = folded_for_inference(net, device, _memory_format(ndim) if channels_last else torch.contiguous_format)
        with torch.inference_mode(), _autocast(device, amp):
            yield run
        return
    was_training = net.training
    net.to(device).eval()
    # The parameters' own tensors are put back afterwards (not a layout conversion): a net in
    # training keeps exactly the strides its optimizer state was made with (fused Adam walks
    # parameter and state memory in lockstep).
    saved = [(p, p.data) for p in net.parameters()] if channels_last else []
    if channels_last:
        net.to(memory_format=_memory_format(ndim))
    try:
        with torch.inference_mode(), _autocast(device, amp):
            yield net
    finally:
        net.train(was_training)
        for param, data in saved:
            param.data = data


def _check_args(
    image: np.ndarray, ndim: int, device: torch.device | str, batch_size: int | None,
    channels_last: bool | None,
) -> tuple[torch.device, int, bool]:
    if image.ndim != ndim + 1:
        raise ValueError(
            f"image must be (C, *spatial) with {ndim} spatial axes, got shape {tuple(image.shape)}"
        )
    device = torch.device(device)
    if batch_size is None:
        batch_size = default_batch_size(device)
    if channels_last is None:
        channels_last = default_channels_last(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return device, batch_size, channels_last


def _pop_concatenate(parts: list[np.ndarray], column_major: bool = False) -> np.ndarray:
    """Concatenate along axis 0, freeing the parts as they are copied (peak: the result plus
    one part). ``column_major``: ``(N, D)`` parts into one F-ordered ``(N, D)`` array."""
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype, order="F" if column_major else "C")
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[at : at + len(part)] = part
        at += len(part)
    return out


@bounded_memory()  # a memory-bounded route: glibc's malloc thresholds (embseg.allocator)
def predict_labels_streamed(
    net: torch.nn.Module,
    image: np.ndarray,
    ndim: int,
    step: Sequence[float],
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_size: int = 10,
    tile_shape: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    channels_last: bool | None = None,
    return_seeds: bool = False,
    max_radius: Sequence[float] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels of an image without ever holding its raw outputs: tile by tile, keep only the
    clustering candidates, then cluster them all at once.

    Equal to :func:`predict_raw` followed by :func:`embseg.cluster.cluster`: the same tiles,
    the same raw values, the same embeddings and bandwidths bit for bit, the candidates in the
    same (C) order. One caveat: torch's vectorised sigmoid rounds some seediness values 1 ulp
    (float32) differently on a tile than on the whole map (its scalar tail loops differ), which
    can matter only for a pixel within 1 ulp of ``fg_thresh`` / ``seed_thresh`` or two seeds
    within 1 ulp of each other. Memory grows with the input, the output and the foreground
    only: one tile's raw outputs at a time, plus per candidate (pixel with seediness above ``fg_thresh``) its flat index, float64
    embedding and bandwidth and its seediness (about ``8 + 16 D + 8`` bytes), instead of
    ``4 (2 D + 1)`` bytes of float32 raw outputs per pixel and the float64 candidate arrays on
    top of them.

    Parameters are those of :func:`predict_raw` and :func:`embseg.cluster.cluster`.

    Returns
    -------
    labels : numpy.ndarray
        ``uint32`` labels of shape ``spatial`` (ids in acceptance order, with gaps as
        :func:`embseg.cluster.cluster`).
    seed : numpy.ndarray, optional
        ``float32`` seediness, when ``return_seeds``.
    """
    device, batch_size, channels_last = _check_args(image, ndim, device, batch_size, channels_last)
    if len(step) != ndim:
        raise ValueError(f"step has {len(step)} entries for {ndim} spatial axes")
    tiles, transforms = _plan(image, ndim, tile_shape, halo, tta)
    spatial = tuple(int(n) for n in image.shape[1:])
    seeds = np.zeros(spatial, dtype=np.float32) if return_seeds else None
    index_parts, seed_parts, emb_parts, s_parts = [], [], [], []
    with _inference(net, device, amp, ndim, channels_last) as run:
        for tile, raw in _tile_outputs(
            run, image, tiles, transforms, batch_size, device, progress, channels_last
        ):
            local, seed = _candidates(raw, fg_thresh)
            origin = [c.start for c in tile.core]
            emb, s = _geometry(raw, local, step, origin)
            pixel = np.unravel_index(local, raw.shape[1:])
            index_parts.append(
                np.ravel_multi_index(tuple(p + o for p, o in zip(pixel, origin, strict=True)), spatial)
            )
            seed_parts.append(seed)
            emb_parts.append(emb)
            s_parts.append(s)
            if seeds is not None:
                seeds[tile.core] = seed_map(raw)
            del raw
    labels = np.zeros(int(np.prod(spatial)), dtype=np.uint32)
    seed = np.concatenate(seed_parts) if seed_parts else np.zeros(0, np.float32)
    del seed_parts
    if seed.size and np.any(_at_least(seed, seed_thresh)):
        # Candidates stay in tile order (no permuted copies); seeds of equal seediness are
        # visited in C order of their pixels, as in one image.
        index = _pop_concatenate(index_parts)
        emb = _pop_concatenate(emb_parts, column_major=True)
        s = _pop_concatenate(s_parts, column_major=True)
        labels[index] = greedy_labels(emb, s, seed.astype(np.float64), step, seed_thresh, min_size,
                                      tie_key=index, max_radius=max_radius)
    labels = labels.reshape(spatial)
    return (labels, seeds) if return_seeds else labels


def predict_labels(
    net: torch.nn.Module,
    image: np.ndarray,
    ndim: int,
    step: Sequence[float],
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_size: int = 10,
    tile_shape: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    tta: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    max_radius: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels of an image: :func:`predict_raw`, then :func:`embseg.cluster.cluster`.

    Returns
    -------
    labels : numpy.ndarray
        ``uint32`` labels of shape ``spatial``.
    seed : numpy.ndarray
        ``float32`` seediness of shape ``spatial``.
    """
    raw = predict_raw(net, image, ndim, tile_shape, halo, tta, device, amp, batch_size, progress)
    labels = cluster(raw, step, seed_thresh=seed_thresh, fg_thresh=fg_thresh, min_size=min_size,
                     max_radius=max_radius)
    return labels, seed_map(raw)
