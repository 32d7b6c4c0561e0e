"""Block-wise prediction of images larger than memory (zarr / OME-Zarr) on dask.distributed.

Geometry of one block, per axis (all N-D; 2D images and 3D volumes take the same path):

* **core**: the block itself. The cores partition the image (:func:`embseg.tiling.tile_grid`,
  boundaries multiples of 8, the network stride).
* **cluster region**: the core grown by ``object_halo`` (clipped to the image). Raw outputs are
  clustered here, with global coordinates (``cluster(..., origin=region start)``), so the
  region must hold every object whose seed lies in the core: ``object_halo`` is the largest
  distance from an object's seed (near its centre) to its farthest pixel.
* **read region**: the cluster region grown by ``context`` (the network's context,
  :meth:`embseg.model.Model.halo`), reflect-padded where it leaves the image. The raw outputs
  on the cluster region then equal those of a pass over the whole image reflect-padded by
  ``context``, which is what tiled in-memory prediction computes.

Ownership: an object belongs to the block whose core holds its seed (the pixel it grew from), so
every object is labelled once, whole, by one block; objects seeded in the halo are dropped by
that block (their owner labels them). A block stores its objects' pixels (inside its cluster
region), their seeds and seediness in a result file. The merge then gives every object a global
id by the order of the in-memory greedy clustering (descending seediness, ties by position in
C order), and writes each output chunk from the blocks whose objects reach it. **Overlaps**:
where objects of different blocks claim the same pixel, the object later in that order (lower
seediness) wins, as a later proposal overwrites earlier labels in the in-memory clustering.
Ids that no pixel keeps are closed up by a final relabel pass, so ids are ``1..N``.

Exactness: with objects smaller than the halo, and objects that do not compete for pixels (each
proposal holds only its own object's pixels: well-separated embeddings, which a good model
produces for touching objects too), the labels equal those of in-memory prediction exactly,
ids included. An owned object that reaches its block's cluster-region border may be cut: it is
counted and reported (raise ``object_halo``).

Normalisation statistics come from the whole image (a regular subsample of at most
``max_samples`` voxels per channel, the same one :func:`embseg.normalize.percentile_stats`
takes in memory), never per block.

Resume: the settings are written to ``.<output name>.embseg-blocks/plan.json`` next to the
output and every finished block to ``blocks/<index>.npz`` (atomically); a run started again with
``resume=True`` and the same settings skips finished blocks. The folder is removed once the
output is complete (``attrs["embseg"]["complete"]``).

Workers must see the input, the output folder and the result files (a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embseg.allocator import bounded_memory
from embseg.errors import UserError
from embseg.tiling import per_axis, tile_grid

#: Block boundaries, halos and the network input are multiples of this (the network stride).
ALIGN = 8
#: Default block (core) shape by number of spatial axes.
DEFAULT_BLOCK = {2: (2048, 2048), 3: (128, 256, 256)}
#: Result folder of an unfinished run, next to the output: ``.<output name>.embseg-blocks``.
WORK_SUFFIX = ".embseg-blocks"


class BlockRunInterrupted(RuntimeError):
    """A run stopped before all blocks were done (finished blocks are kept for resuming)."""


def _round_up(value: int, multiple: int = ALIGN) -> int:
    return int(math.ceil(value / multiple) * multiple)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Block:
    """One block of a block-wise run (see the module docstring).

    Attributes
    ----------
    index
        Position in C order of the block grid.
    core, cluster, read
        Slices in image coordinates: the block, the clustered region, the region read.
    pad
        Per axis ``(before, after)`` reflection padding of the read region past the image.
    """

    index: int
    core: tuple[slice, ...]
    cluster: tuple[slice, ...]
    read: tuple[slice, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def cluster_in_padded(self) -> tuple[slice, ...]:
        """Slices of the cluster region within the padded read region."""
        return tuple(
            slice(c.start - r.start + before, c.stop - r.start + before)
            for c, r, (before, _) in zip(self.cluster, self.read, self.pad, strict=True)
        )


def plan_blocks(
    shape: Sequence[int],
    block_shape: int | Sequence[int],
    object_halo: int | Sequence[int],
    context: int | Sequence[int],
) -> list[Block]:
    """The blocks of an image of spatial ``shape``, in C order of the block grid.

    Parameters
    ----------
    shape
        Spatial shape of the image.
    block_shape
        Core shape per axis; rounded up to a multiple of 8 (the last block per axis takes the
        rest).
    object_halo, context
        Per axis (or one int): cluster-region margin and network context, each rounded up to a
        multiple of 8.

    Examples
    --------
    >>> b = plan_blocks((100,), 40, 10, 8)
    >>> [(x.core[0].start, x.core[0].stop) for x in b]
    [(0, 40), (40, 80), (80, 100)]
    >>> b[1].cluster, b[1].read
    ((slice(24, 96, None),), (slice(16, 100, None),))
    """
    ndim = len(shape)
    blocks = per_axis(block_shape, ndim, "block_shape")
    halo = tuple(_round_up(h) for h in per_axis(object_halo, ndim, "object_halo"))
    ctx = tuple(_round_up(c) for c in per_axis(context, ndim, "context"))
    if any(b < 1 for b in blocks) or any(h < 0 for h in halo + ctx):
        raise UserError(f"block shape {blocks} must be positive and halos >= 0")
    tiles = tile_grid(shape, [_round_up(b) for b in blocks], 0, align=ALIGN)
    out = []
    for i, tile in enumerate(tiles):
        cluster = tuple(
            slice(max(s.start - h, 0), min(s.stop + h, n))
            for s, h, n in zip(tile.core, halo, shape, strict=True)
        )
        # The network's context around the cluster region; past the image, reflection by the
        # context only (as tiled in-memory prediction pads), not by halo + context.
        read = tuple(slice(max(c.start - x, 0), min(c.stop + x, n)) for c, x, n in zip(cluster, ctx, shape, strict=True))
        pad = tuple((max(x - c.start, 0), max(c.stop + x - n, 0)) for c, x, n in zip(cluster, ctx, shape, strict=True))
        out.append(Block(i, tile.core, cluster, read, pad))
    return out


# --------------------------------------------------------------------------------------------
# image sources


@dataclass
class ArraySource:
    """An in-memory (or memory-mapped) image as a block source: ``array`` is ``(C, *spatial)``."""

    array: Any

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape[1:])

    @property
    def n_channels(self) -> int:
        return int(self.array.shape[0])

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        region = tuple(region) if region is not None else (slice(None),) * (self.array.ndim - 1)
        return np.asarray(self.array[(slice(None), *region)])


def as_source(image: Any, axes: str | None = None, ndim: int | None = None) -> Any:
    """A block source from a path (zarr / OME-Zarr), a :class:`~embseg.zarr_io.ZarrImage`, or an
    array with ``axes`` (channel-first ``(C, *spatial)`` when ``axes`` is None)."""
    from embseg.io import to_channel_first
    from embseg.zarr_io import ZarrImage, open_zarr_image

    if isinstance(image, str | os.PathLike):
        return open_zarr_image(image, axes=axes, ndim=ndim)
    if isinstance(image, ZarrImage | ArraySource):
        return image
    if axes is not None:
        image = to_channel_first(image, axes)
    if ndim is not None and image.ndim != ndim + 1:
        raise UserError(f"image of shape {tuple(image.shape)} is not (C, *spatial) with {ndim} spatial axes")
    return ArraySource(image)


def volume_stats(
    source: Any, low: float, high: float, max_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile statistics of a whole image from a regular subsample read lazily.

    The subsample is every ``f``-th voxel along every spatial axis, ``f`` the smallest giving at
    most ``max_samples`` voxels, the same sample :func:`embseg.normalize.percentile_stats` takes of
    an in-memory image; so the statistics equal the in-memory ones.
    """
    from embseg.normalize import DEFAULT_MAX_SAMPLES, percentile_stats

    max_samples = DEFAULT_MAX_SAMPLES if max_samples is None else int(max_samples)
    shape = source.spatial_shape
    size = math.prod(shape)
    factor = 1
    if size > max_samples:
        factor = math.ceil((size / max_samples) ** (1.0 / len(shape)))
        while math.prod(math.ceil(n / factor) for n in shape) > max_samples:
            factor += 1
    sample = source.read(tuple(slice(None, None, factor) for _ in shape))
    return percentile_stats(sample, low, high, max_samples=None)


# --------------------------------------------------------------------------------------------
# one block


@dataclass(frozen=True)
class BlockSettings:
    """What every block task needs besides the model, the image and its block."""

    shape: tuple[int, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    seed_thresh: float
    fg_thresh: float
    min_size: int
    tta: bool = False
    device: str = "auto"
    tile_shape: tuple[int, ...] | None = None
    torch_threads: int | None = None


@dataclass
class BlockObjects:
    """The objects a block owns, as stored in its result file.

    Attributes
    ----------
    labels
        ``uint32`` crop (bounding box of the owned objects) with ids ``1..k``, 0 elsewhere.
    offset
        Global index of the crop's first pixel.
    seed_position
        ``(k, D)`` global index of each object's seed.
    seed_value
        ``(k,)`` float32 seediness at the seed.
    cut
        ``(k,)`` whether the object reaches an inner border of the cluster region.
    """

    labels: np.ndarray
    offset: np.ndarray
    seed_position: np.ndarray
    seed_value: np.ndarray
    cut: np.ndarray

    def save(self, path: Path) -> None:
        """Write as an ``.npz`` file, atomically."""
        from embseg.io import atomic_write

        with atomic_write(path, overwrite=True) as tmp:
            np.savez_compressed(tmp, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> BlockObjects:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in ("labels", "offset", "seed_position", "seed_value", "cut")})


def owned_objects(
    labels: np.ndarray, seeds: np.ndarray, seediness: np.ndarray, block: Block, shape: Sequence[int]
) -> BlockObjects:
    """Keep the objects of a clustered block whose seed lies in the block's core.

    Parameters
    ----------
    labels
        Labels of the cluster region (from :func:`embseg.cluster.cluster`).
    seeds
        Flat index into the cluster region of each label's seed (``return_seeds=True``).
    seediness
        Seediness map of the cluster region.
    block
        The block.
    shape
        Spatial shape of the image.
    """
    ndim = labels.ndim
    start = np.array([s.start for s in block.cluster], dtype=np.int64)
    local = np.stack(np.unravel_index(seeds, labels.shape), axis=1).astype(np.int64) if seeds.size else np.zeros((0, ndim), np.int64)
    position = local + start
    lo = np.array([s.start for s in block.core])
    hi = np.array([s.stop for s in block.core])
    inside = np.all((position >= lo) & (position < hi), axis=1)
    present = np.zeros(seeds.size + 1, dtype=bool)
    present[np.unique(labels)] = True
    keep = np.flatnonzero(inside & present[1:]) + 1  # label ids owned and still holding pixels
    lut = np.zeros(seeds.size + 1, dtype=np.uint32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.uint32)
    mine = lut[labels]
    if keep.size == 0:
        crop = tuple(slice(0, 0) for _ in range(ndim))
    else:
        nz = np.nonzero(mine)
        crop = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
    cut = np.zeros(keep.size + 1, dtype=bool)
    for d in range(ndim):
        for at, inner in ((0, block.cluster[d].start > 0), (-1, block.cluster[d].stop < shape[d])):
            if inner:
                cut[np.unique(np.take(mine, at, axis=d))] = True
    seed_local = local[keep - 1]
    return BlockObjects(
        labels=np.ascontiguousarray(mine[crop]),
        offset=start + np.array([s.start for s in crop], dtype=np.int64),
        seed_position=position[keep - 1],
        seed_value=seediness[tuple(seed_local.T)].astype(np.float32),
        cut=cut[1:],
    )


@bounded_memory()  # a memory-bounded route: glibc's malloc thresholds (embseg.allocator)
def segment_block(model: Any, source: Any, block: Block, settings: BlockSettings) -> BlockObjects:
    """Read, normalise, predict and cluster one block; return the objects it owns."""
    from embseg.cluster import cluster, seed_map
    from embseg.normalize import apply_normalization

    region = source.read(block.read)
    region = apply_normalization(region, np.asarray(settings.lo), np.asarray(settings.hi))
    if any(before or after for before, after in block.pad):
        region = np.pad(region, [(0, 0), *block.pad], mode="reflect")
    raw = model.predict_raw(
        region, normalized=True, tta=settings.tta, tile_shape=settings.tile_shape,
        device=_worker_device(settings.device),
    )
    raw = raw[(slice(None), *block.cluster_in_padded)].contiguous()
    origin = [s.start for s in block.cluster]
    labels, seeds = cluster(
        raw, model.config.grid_step, seed_thresh=settings.seed_thresh,
        fg_thresh=settings.fg_thresh, min_size=settings.min_size, origin=origin, return_seeds=True,
        max_radius=model.config.seed_radius(),
    )
    return owned_objects(labels, seeds, seed_map(raw), block, settings.shape)


def _worker_device(device: str) -> str:
    """``auto`` on a machine with several GPUs: one GPU per local dask worker (by its name)."""
    if device not in ("auto", None):
        return device
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            return "auto"
        if isinstance(name, int):
            return f"cuda:{name % torch.cuda.device_count()}"
    return "auto"


def _rss_mb() -> float | None:
    """Resident memory of this process now (Linux only)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process.

    Linux: ``VmHWM`` of the process's own address space. (``ru_maxrss`` would not do: it keeps
    the high-water mark across ``exec``, so a freshly spawned dask worker would report at least
    the RSS its parent had when it forked.) Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def run_block(model: Any, source: Any, block: Block, settings: BlockSettings, result: str) -> dict[str, Any]:
    """Dask task: segment one block, write its result file, return a small summary."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    start, cpu = time.perf_counter(), time.process_time()
    objects = segment_block(model, source, block, settings)
    objects.save(Path(result))
    try:
        from distributed import get_worker

        worker = str(get_worker().address)
    except (ImportError, ValueError):
        worker = f"pid {os.getpid()}"
    return {
        "index": block.index,
        "objects": int(objects.seed_value.size),
        "cut": int(objects.cut.sum()),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "voxels": math.prod(s.stop - s.start for s in block.core),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_mb": _rss_mb(),
        "worker": worker,
        "pid": os.getpid(),
    }


# --------------------------------------------------------------------------------------------
# merge


def global_ids(seed_positions: Sequence[np.ndarray], seed_values: Sequence[np.ndarray], shape: Sequence[int]) -> list[np.ndarray]:
    """Global ids ``1..N`` of all blocks' objects, in the in-memory clustering's seed order.

    Order: descending seediness, ties by the seed's flat index (C order), as the greedy
    clustering visits seeds. Returns one id array per block.
    """
    counts = [len(v) for v in seed_values]
    if sum(counts) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in counts]
    positions = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1, len(shape)) for p in seed_positions])
    values = np.concatenate([np.asarray(v, dtype=np.float32) for v in seed_values]).astype(np.float64)
    flat = np.ravel_multi_index(tuple(positions.T), tuple(shape))
    order = np.lexsort((flat, -values))
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = np.arange(1, order.size + 1)
    return np.split(ids, np.cumsum(counts)[:-1])


def _intersection(a: Sequence[slice], b_start: Sequence[int], b_shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Overlap of region ``a`` with the box at ``b_start`` of ``b_shape``: slices into each."""
    in_a, in_b = [], []
    for s, o, n in zip(a, b_start, b_shape, strict=True):
        lo, hi = max(s.start, int(o)), min(s.stop, int(o) + int(n))
        if lo >= hi:
            return None
        in_a.append(slice(lo - s.start, hi - s.start))
        in_b.append(slice(lo - int(o), hi - int(o)))
    return tuple(in_a), tuple(in_b)


def merge_chunk(region: tuple[slice, ...], parts: Sequence[tuple[str, np.ndarray]], output: str, dtype: str) -> np.ndarray:
    """Dask task: write one output region from the objects of the blocks that reach it.

    ``parts`` are ``(result file, global ids of its objects)``. Where objects overlap, the
    larger global id (later in seed order) wins. Returns the ids present in the region.
    """
    from embseg.zarr_io import _zarr

    out = np.zeros([s.stop - s.start for s in region], dtype=dtype)
    for path, ids in parts:
        objects = BlockObjects.load(Path(path))
        overlap = _intersection(region, objects.offset, objects.labels.shape)
        if overlap is None:
            continue
        in_out, in_crop = overlap
        lut = np.concatenate([[0], np.asarray(ids)]).astype(dtype)
        np.maximum(out[in_out], lut[objects.labels[in_crop]], out=out[in_out])
    array = _zarr().open_array(output, mode="r+")
    array[region] = out
    present = np.unique(out)
    return present[present > 0]


def relabel_chunk(region: tuple[slice, ...], lut: np.ndarray, output: str) -> None:
    """Dask task: apply a lookup table to one output region."""
    from embseg.zarr_io import _zarr

    array = _zarr().open_array(output, mode="r+")
    array[region] = lut[array[region]]


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class BlockRunReport:
    """What a block-wise run did."""

    output: Path
    n_objects: int
    n_blocks: int
    n_computed: int
    n_resumed: int
    n_cut: int
    seconds: float
    voxels: int
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    block_seconds: float = 0.0
    block_cpu_seconds: float = 0.0
    startup_seconds: float = 0.0
    blocks: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def voxels_per_second(self) -> float:
        """Image voxels per second of wall time (whole run: statistics, blocks, merge)."""
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")


def default_object_halo(model: Any) -> tuple[int, ...]:
    """Half the model's training crop (itself mean + 5 std of the object extents), per axis.

    An object's seed lies near its centre, so its farthest pixel is about half its extent away.
    Without a crop size in the config: 32 pixels (16 in Z).
    """
    crop = model.config.crop_size
    if crop:
        return tuple(_round_up(int(c) / 2) for c in crop)
    return (32,) * 2 if model.ndim == 2 else (16, 32, 32)


def _weights_digest(model: Any) -> str:
    digest = hashlib.sha1()
    for key, value in model.net.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def work_folder(output: Path) -> Path:
    """Where a run keeps its plan and block results until the output is complete."""
    return output.parent / f".{output.name}{WORK_SUFFIX}"


@contextlib.contextmanager
def dask_client(
    scheduler: Any = None, n_workers: int | None = None, processes: bool = True, device: str = "auto"
) -> Iterator[tuple[Any, int | None]]:
    """A ``distributed.Client`` and the torch threads each worker should use.

    ``scheduler``: an existing ``Client`` (used as is), a scheduler address (``tcp://host:8786``),
    or None for a ``LocalCluster`` sized to the machine: one worker per GPU, else one per 4 CPU
    cores (at least 1) with the cores shared out among them as torch threads.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("block-wise prediction needs dask.distributed: pip install 'embseg[zarr]'") from None
    if isinstance(scheduler, Client):
        yield scheduler, None
        return
    if scheduler:
        try:
            client = Client(str(scheduler), timeout="30s")
        except (OSError, TimeoutError) as err:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({err})") from None
        with client:
            yield client, None
        return
    import torch

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if device in ("auto", None) or str(device).startswith("cuda") else 0
    if n_workers is None:
        n_workers = gpus if gpus else max(1, cores // 4)
    threads = max(1, cores // n_workers)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client, threads


def _check_work(work: Path, plan: dict[str, Any], resume: bool) -> None:
    plan_file = work / "plan.json"
    if not plan_file.is_file():
        return
    if not resume:
        raise UserError(
            f"{work}: an unfinished block-wise run is there; resume it (--resume) or start over (--overwrite)"
        )
    try:
        old = json.loads(plan_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{plan_file}: unreadable; start over with --overwrite") from None
    changed = sorted(k for k in set(plan) | set(old) if plan.get(k) != old.get(k))
    if changed:
        raise UserError(
            f"{work}: the unfinished run used other settings ({', '.join(changed)}); "
            "use the same settings to resume, or --overwrite"
        )


def predict_blocks(
    model: Any,
    image: Any,
    output: str | Path,
    block_shape: int | Sequence[int] | None = None,
    object_halo: int | Sequence[int] | None = None,
    context: int | Sequence[int] | None = None,
    axes: str | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    processes: bool = True,
    tta: bool = False,
    seed_thresh: float | None = None,
    fg_thresh: float | None = None,
    min_size: int | None = None,
    device: str = "auto",
    tile_shape: tuple[int, ...] | None = None,
    max_samples: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_blocks: bool = False,
    progress: bool = True,
    source_image: str | None = None,
    _stop_after: int | None = None,
) -> BlockRunReport:
    """Segment a large image block by block on a dask cluster; write an OME-Zarr label image.

    Parameters
    ----------
    model
        A :class:`embseg.model.Model`.
    image
        A zarr / OME-Zarr path, a :class:`~embseg.zarr_io.ZarrImage`, or an array (channel-first
        ``(C, *spatial)``, or with ``axes``).
    output
        Label image to write (``<name>.zarr``, OME-Zarr v0.4), see
        :func:`embseg.zarr_io.create_label_image`.
    block_shape
        Core shape per axis (one int for all); default :data:`DEFAULT_BLOCK`. Worker memory
        grows with ``block_shape + 2 * (object_halo + context)``, not with the image.
    object_halo
        Largest distance (pixels per axis) from an object's seed to its farthest pixel;
        default :func:`default_object_halo`.
    context
        Network context read around the cluster region; default ``model.halo()``.
    axes
        Axes of ``image`` (overrides zarr metadata).
    scheduler, n_workers, processes
        Dask scheduler address or ``Client``; otherwise a ``LocalCluster`` of ``n_workers``
        (default: sized to the machine), worker processes unless ``processes=False``.
    tta, seed_thresh, fg_thresh, min_size, device, tile_shape
        As for :meth:`embseg.model.Model.predict` (``tile_shape`` tiles within a block).
    max_samples
        Voxels per channel for the normalisation statistics (see :func:`volume_stats`).
    resume
        Continue an interrupted run with the same settings (finished blocks are skipped).
    overwrite
        Replace an existing output and any unfinished run.
    keep_blocks
        Keep the block result files after the merge.
    progress
        Progress bars on stderr.
    source_image
        ``image-label.source.image`` of the output (``"../../"`` when writing ``labels/<name>``
        inside the input image, see :func:`embseg.zarr_io.label_group_in_image`).

    Returns
    -------
    BlockRunReport
    """
    from embseg.zarr_io import json_attr

    started = time.perf_counter()
    source = as_source(image, axes=axes, ndim=model.ndim)
    if source.n_channels != model.config.in_channels:
        raise UserError(
            f"{getattr(source, 'path', 'image')}: {source.n_channels} channel(s) but the model expects "
            f"{model.config.in_channels}"
        )
    shape = source.spatial_shape
    block_shape, halo, ctx = block_geometry(model, shape, block_shape, object_halo, context)
    blocks = plan_blocks(shape, block_shape, halo, ctx)
    output = Path(output).expanduser()
    work = work_folder(output)
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)
    settings = _settings(model, source, tta, seed_thresh, fg_thresh, min_size, device, tile_shape, max_samples)
    plan = json_attr({
        "source": str(getattr(source, "path", "array")), "shape": shape, "block_shape": block_shape,
        "object_halo": halo, "context": ctx, "weights": _weights_digest(model), "grid_step": model.config.grid_step,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("device", "torch_threads")},
    })
    _check_work(work, plan, resume)
    if output.exists() and not overwrite and not (work / "plan.json").is_file():
        # (an unfinished run's own output, killed in the merge, is simply written again)
        raise UserError(f"{output}: already exists; use --overwrite to replace it")
    results = work / "blocks"
    results.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=1))
    todo = [b for b in blocks if not (results / f"{b.index}.npz").is_file()]
    n_done = len(blocks) - len(todo)
    if _stop_after is not None:  # test hook: as if the run were killed after k blocks
        todo = todo[:_stop_after]
    startup = time.perf_counter()
    with dask_client(scheduler, n_workers, processes, device) as (client, threads):
        startup = time.perf_counter() - startup
        block_time = time.perf_counter()
        if threads:
            settings = BlockSettings(**{**asdict(settings), "torch_threads": threads})
        summaries = _run_blocks(client, model, source, todo, settings, results, progress, len(blocks), n_done)
        block_time = time.perf_counter() - block_time
        if len(summaries) + n_done < len(blocks):
            raise BlockRunInterrupted(f"stopped after {len(summaries)} of {len(blocks)} blocks (test hook)")
        attrs = {"embseg": json_attr({"complete": False, "model": model.config.name,
                                      "model_source": getattr(model, "source", ""), "block_shape": block_shape,
                                      "object_halo": halo, "context": ctx, "source": plan["source"]})}
        create = dict(voxel_size=getattr(source, "voxel_size", None), unit=getattr(source, "unit", None),
                      attributes=attrs, source_image=source_image)
        n_objects, n_cut = merge_blocks(client, blocks, results, shape, block_shape, output, create, progress)
    if n_cut:
        warnings.warn(
            f"{output}: {n_cut} object(s) reach the edge of their block's halo and may be cut; "
            f"raise the object halo (now {halo})", stacklevel=2,
        )
    if not keep_blocks:
        shutil.rmtree(work, ignore_errors=True)
    peaks: dict[str, float] = {}
    for s in summaries:
        if s["peak_rss_mb"] is not None:
            peaks[s["worker"]] = max(peaks.get(s["worker"], 0.0), float(s["peak_rss_mb"]))
    return BlockRunReport(
        output=output, n_objects=n_objects, n_blocks=len(blocks), n_computed=len(summaries),
        n_resumed=n_done, n_cut=n_cut, seconds=time.perf_counter() - started,
        voxels=math.prod(shape), peak_rss_mb=peaks, block_seconds=block_time,
        block_cpu_seconds=float(sum(s["cpu_seconds"] for s in summaries)), startup_seconds=startup,
        blocks=sorted(summaries, key=lambda s: s["index"]),
    )


def block_geometry(
    model: Any,
    shape: Sequence[int],
    block_shape: int | Sequence[int] | None = None,
    object_halo: int | Sequence[int] | None = None,
    context: int | Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Block shape, object halo and context per axis, with the defaults filled in and each rounded
    up to a multiple of 8 (a block is at most the image, rounded up)."""
    ndim = len(shape)
    wanted = per_axis(block_shape if block_shape is not None else DEFAULT_BLOCK[ndim], ndim, "block_shape")
    if any(b < 1 for b in wanted):
        raise UserError(f"block shape {wanted} must be positive")
    blocks = tuple(_round_up(min(b, _round_up(n))) for b, n in zip(wanted, shape, strict=True))
    halo = per_axis(object_halo if object_halo is not None else default_object_halo(model), ndim, "object_halo")
    ctx = per_axis(context if context is not None else model.halo(), ndim, "context")
    if any(v < 0 for v in halo + ctx):
        raise UserError(f"object halo {halo} and context {ctx} must be >= 0")
    return blocks, tuple(_round_up(h) for h in halo), tuple(_round_up(c) for c in ctx)


def _settings(model: Any, source: Any, tta: bool, seed_thresh: float | None, fg_thresh: float | None,
              min_size: int | None, device: str, tile_shape: tuple[int, ...] | None,
              max_samples: int | None) -> BlockSettings:
    cfg = model.config
    lo, hi = volume_stats(source, cfg.norm_low, cfg.norm_high, max_samples)
    default_seed, default_fg = cfg.thresholds(tta)
    return BlockSettings(
        shape=tuple(source.spatial_shape), lo=tuple(float(v) for v in lo), hi=tuple(float(v) for v in hi),
        seed_thresh=float(default_seed if seed_thresh is None else seed_thresh),
        fg_thresh=float(default_fg if fg_thresh is None else fg_thresh),
        min_size=int(cfg.min_size if min_size is None else min_size),
        tta=bool(tta), device=str(device), tile_shape=tile_shape,
    )


def _run_blocks(client: Any, model: Any, source: Any, todo: Sequence[Block], settings: BlockSettings,
                results: Path, progress: bool, n_blocks: int, n_done: int) -> list[dict[str, Any]]:
    """Submit the block tasks (model and image shipped once to every worker); their summaries."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    model.net.eval()
    shared_model, shared_source = client.scatter([model, source], broadcast=True, hash=False)
    futures = [client.submit(run_block, shared_model, shared_source, b, settings, str(results / f"{b.index}.npz"),
                             pure=False) for b in todo]
    summaries = []
    with tqdm(total=n_blocks, initial=n_done, desc="blocks", unit="block", disable=not progress,
              file=sys.stderr) as bar:
        try:
            for future in as_completed(futures):
                summaries.append(future.result())
                bar.update(1)
        except BaseException:
            client.cancel(futures)
            raise
    return summaries


def _cores_reached(starts: Sequence[np.ndarray], box_start: Sequence[int], box_shape: Sequence[int]) -> list[int]:
    """Indices (C order of the block grid) of the cores that a box reaches.

    ``starts[d]``: the ascending core starts along axis ``d``.

    Examples
    --------
    >>> _cores_reached([np.array([0, 8]), np.array([0, 8, 16])], (6, 7), (4, 2))
    [0, 1, 3, 4]
    """
    if not all(box_shape):
        return []
    ranges = []
    for axis_starts, lo, n in zip(starts, box_start, box_shape, strict=True):
        first = int(np.searchsorted(axis_starts, lo, side="right")) - 1
        last = int(np.searchsorted(axis_starts, lo + n - 1, side="right")) - 1
        ranges.append(range(first, last + 1))
    grid = tuple(len(a) for a in starts)
    return [int(np.ravel_multi_index(index, grid)) for index in itertools.product(*ranges)]


def merge_blocks(client: Any, blocks: Sequence[Block], results: Path, shape: Sequence[int],
                 block_shape: Sequence[int], output: Path, create: dict[str, Any],
                 progress: bool) -> tuple[int, int]:
    """Global ids by seed order, the label image written chunk by chunk, ids closed up.

    Returns the number of objects and of objects that may be cut.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    from embseg.zarr_io import _zarr, block_aligned_chunks, create_label_image

    metas = []
    for b in blocks:
        with np.load(results / f"{b.index}.npz") as data:
            metas.append({k: data[k] for k in ("offset", "seed_position", "seed_value", "cut")}
                         | {"crop_shape": data["labels"].shape})
    ids = global_ids([m["seed_position"] for m in metas], [m["seed_value"] for m in metas], shape)
    n_objects = int(sum(len(i) for i in ids))
    dtype = "uint32" if n_objects < 2**32 else "uint64"
    create_label_image(output, shape, block_aligned_chunks(block_shape), dtype=dtype, overwrite=True, **create)
    array_path = str(output / "0")
    starts = [np.unique([b.core[d].start for b in blocks]) for d in range(len(shape))]
    parts: dict[int, list[tuple[str, np.ndarray]]] = {b.index: [] for b in blocks}
    for b, meta in zip(blocks, metas, strict=True):
        if len(ids[b.index]):
            for index in _cores_reached(starts, meta["offset"], meta["crop_shape"]):
                parts[index].append((str(results / f"{b.index}.npz"), ids[b.index]))
    merges = [client.submit(merge_chunk, b.core, parts[b.index], array_path, dtype, pure=False) for b in blocks]
    present = [f.result() for f in tqdm(as_completed(merges), total=len(merges), desc="merge", unit="block",
                                        disable=not progress, file=sys.stderr)]
    kept = np.unique(np.concatenate(present)) if present else np.zeros(0, dtype=np.int64)
    if kept.size != n_objects:  # objects that lost all their pixels: close up the ids
        lut = np.zeros(n_objects + 1, dtype=dtype)
        lut[kept] = np.arange(1, kept.size + 1, dtype=dtype)
        shared_lut = client.scatter(lut, broadcast=True)
        client.gather([client.submit(relabel_chunk, b.core, shared_lut, array_path, pure=False) for b in blocks])
    group = _zarr().open_group(str(output), mode="r+")
    group.attrs["embseg"] = {**group.attrs["embseg"], "complete": True, "n_objects": int(kept.size)}
    return int(kept.size), int(sum(int(m["cut"].sum()) for m in metas))
