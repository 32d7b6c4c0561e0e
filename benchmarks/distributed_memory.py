"""Block-wise prediction: peak RSS per dask worker and throughput, for volumes of 16x and 64x a block.

Writes synthetic OME-Zarr volumes of touching/separated nuclei-like balls, predicts them
block-wise on a ``LocalCluster`` of worker *processes* (so every worker's peak RSS is its own,
read as ``VmHWM`` in the worker after each block), and checks the labels against the
known ones. The point: a worker's peak memory is set by the block shape, not by the volume.

Network (``--net``):

* ``oracle`` (default): the image holds the ideal raw outputs of the known labels (7 channels,
  float16 on disk); the "network" undoes the normalisation. Clustering and I/O are real, the
  network costs nothing: on a CPU-only machine this isolates what block-wise prediction itself
  costs.
* ``erfnet``: a randomly initialised 3D branched ERFNet on a 1-channel image: the real
  network's memory and speed (labels are meaningless, so they are not checked).

Usage::

    python benchmarks/distributed_memory.py                     # writes RESULTS_distributed.md
    python benchmarks/distributed_memory.py --net erfnet --block 32,64,64 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

H = 1.0 / 1023.0


class OracleNet(nn.Module):
    """De-normalises its input (the ideal raw outputs): output = input * (hi - lo) + lo."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, ndim: int = 3):
        super().__init__()
        view = (1, -1) + (1,) * ndim
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32).view(view))
        self.register_buffer("span", torch.tensor(hi - lo, dtype=torch.float32).view(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.span + self.lo


def ball_labels(shape: tuple[int, ...], spacing: int, radius: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balls on a jittered grid (some touching), drawn in their own boxes; labels and centres."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint32)
    centres = []
    grid = [np.arange(spacing // 2, n - spacing // 2, spacing) for n in shape]
    for c in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3):
        c = c + rng.integers(-spacing // 4, spacing // 4 + 1, 3)
        r = rng.uniform(*radius)
        lo = np.maximum(c - math.ceil(r), 0)
        hi = np.minimum(c + math.ceil(r) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        idx = np.indices(hi - lo) + lo.reshape(-1, 1, 1, 1)
        ball = ((idx - c.reshape(-1, 1, 1, 1)) ** 2).sum(0) <= r * r
        free = ball & (labels[box] == 0)
        if free.sum() < 20 or not free[tuple(c - lo)]:
            continue
        centres.append(c)
        labels[box][free] = len(centres)
    return labels, np.array(centres)


def ideal_raw_chunk(labels: np.ndarray, centres: np.ndarray, origin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ideal raw outputs ``(7, *chunk)`` float16 of a chunk of the label volume."""
    raw = np.empty((7, *labels.shape), dtype=np.float32)
    raw[:3] = rng.uniform(-0.3, 0.3, (3, *labels.shape))
    raw[3:6] = rng.uniform(0.0, 1.0, (3, *labels.shape))
    raw[6] = rng.uniform(-12, -6, labels.shape)
    fg = np.nonzero(labels)
    d = centres[labels[fg] - 1] - (np.stack(fg, 1) + origin)
    raw[(slice(0, 3), *fg)] = np.arctanh(d.T * H)
    raw[(slice(3, 6), *fg)] = math.log(math.log(2.0) / (2 * H) ** 2) / 10.0
    dist = np.sqrt((d**2).sum(1))
    raw[(6, *fg)] = np.where(dist == 0, 7.0, np.maximum(3.5 - 0.02 * dist, 0.5))
    return raw.astype(np.float16)


def write_volume(path: Path, shape: tuple[int, ...], net: str, seed: int = 0) -> np.ndarray:
    """The input OME-Zarr (written chunk by chunk); returns the known labels."""
    from embseg.zarr_io import _create_array, _open_group_v2, multiscales_metadata

    labels, centres = ball_labels(shape, spacing=16, radius=(4.0, 7.5), seed=seed)
    group = _open_group_v2(path, "w")
    channels = 7 if net == "oracle" else 1
    meta = multiscales_metadata("CZYX", None, None, path.stem)
    meta[0].pop("type")
    group.attrs["multiscales"] = meta
    chunk = (32, 64, 64)
    array = _create_array(group, "0", (channels, *shape), (channels, *chunk), "float16" if net == "oracle" else "uint16")
    rng = np.random.default_rng(seed + 1)
    for index in np.ndindex(*[math.ceil(n / c) for n, c in zip(shape, chunk, strict=True)]):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunk, shape, strict=True))
        if net == "oracle":
            data = ideal_raw_chunk(labels[box], centres, np.array([s.start for s in box]), rng)
        else:
            data = ((labels[box] > 0) * 600 + rng.normal(100, 20, labels[box].shape)).astype(np.uint16)[None]
        array[(slice(None), *box)] = data
    return labels


def make_model(net: str, source, context: int):
    from embseg.config import ModelConfig
    from embseg.distributed import volume_stats
    from embseg.model import Model, build_network

    if net == "oracle":
        config = ModelConfig(ndim=3, in_channels=7, grid_step=[H] * 3, min_size=20, halo=context)
        lo, hi = volume_stats(source, config.norm_low, config.norm_high)
        return Model(config, OracleNet(lo, hi))
    torch.manual_seed(0)
    config = ModelConfig(ndim=3, in_channels=1, grid_step=[H] * 3, min_size=20, halo=context)
    return Model(config, build_network(config).eval())


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0].astype(np.int64), b[b > 0].astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def run_case(factor: tuple[int, int, int], block: tuple[int, int, int], args, work: Path) -> dict:
    from embseg.distributed import predict_blocks
    from embseg.zarr_io import open_zarr_image, read_zarr_labels

    shape = tuple(f * b for f, b in zip(factor, block, strict=True))
    path = work / f"vol_{'x'.join(map(str, shape))}.ome.zarr"
    labels = write_volume(path, shape, args.net)
    source = open_zarr_image(path)
    model = make_model(args.net, source, args.context)
    gc.collect()
    out = work / f"labels_{'x'.join(map(str, shape))}.zarr"
    report = predict_blocks(model, source, out, block_shape=block, object_halo=args.halo, context=args.context,
                            n_workers=args.workers, processes=True, progress=False, overwrite=True)
    correct = same_partition(read_zarr_labels(out), labels) if args.net == "oracle" else None
    return {
        "shape": shape, "voxels": math.prod(shape), "blocks": report.n_blocks, "ratio": math.prod(factor),
        "objects": report.n_objects, "true_objects": int(labels.max()), "seconds": report.seconds,
        "block_seconds": report.block_seconds, "mvox_s": report.voxels_per_second / 1e6,
        "startup": report.startup_seconds, "cpu": report.block_cpu_seconds,
        "rss": sorted(report.peak_rss_mb.values()), "correct": correct,
        "input_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=["oracle", "erfnet"], default="oracle")
    parser.add_argument("--block", default="32,64,64", help="block (core) shape Z,Y,X")
    parser.add_argument("--halo", type=int, default=8, help="object halo (pixels)")
    parser.add_argument("--context", type=int, default=8, help="network context (pixels)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--factors", default="2x4x2,4x4x4,4x8x4", help="volume / block per axis, comma-separated")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS_distributed.md")))
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--append", action="store_true", help="add the table to --output instead of replacing it")
    args = parser.parse_args(argv)
    block = tuple(int(v) for v in args.block.split(","))
    factors = [tuple(int(v) for v in f.split("x")) for f in args.factors.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="embseg-dist-"))
    rows = []
    try:
        for factor in factors:
            row = run_case(factor, block, args, work)
            rows.append(row)
            print(row, file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/distributed_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(Path(args.output), rows, block, args, command.strip(), append=args.append)
    return 0


def write_results(path: Path, rows: list[dict], block, args, command: str, append: bool = False) -> None:
    read = [b + 2 * (args.halo + args.context) for b in block]
    title = "# Block-wise prediction: memory per worker and throughput"
    lines = [
        *([] if append else [title, ""]),
        f"## Network `{args.net}`, block {block}",
        "",
        f"Command: `{command}` (from the repository root; {time.strftime('%Y-%m-%d')}).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; dask LocalCluster of {args.workers} worker processes, 1 thread each.",
        f"Network: `{args.net}`; block (core) {block}, object halo {args.halo}, context {args.context}: each "
        f"block reads {tuple(read)} = {math.prod(read) / 1e6:.2f} M voxels.",
        "",
        "| volume (Z, Y, X) | volume / block | blocks | voxels | objects (true) | labels correct | "
        "wall s (cluster start) | blocks s | block CPU s | M voxel/s wall | M voxel per CPU s | "
        "peak RSS per worker (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "n/a"}[r["correct"]]
        rss = ", ".join(f"{v:.0f}" for v in r["rss"])
        lines.append(
            f"| {r['shape']} | {r['ratio']}x | {r['blocks']} | {r['voxels'] / 1e6:.1f} M | {r['objects']} "
            f"({r['true_objects']}) | {ok} | {r['seconds']:.1f} ({r['startup']:.1f}) | {r['block_seconds']:.1f} | "
            f"{r['cpu']:.1f} | {r['mvox_s']:.3g} | {r['voxels'] / 1e6 / max(r['cpu'], 1e-9):.3g} | {rss} |"
        )
    lines += [
        "",
        "Peak RSS is each worker process's high-water mark (`VmHWM`) after its last block task; it "
        "includes the Python, torch, zarr and dask runtime (about 300 MB of it). Wall time covers starting the local "
        "cluster (in brackets), the normalisation statistics, all blocks, the merge and the relabel "
        "pass, not writing the input. Block CPU s is the CPU time the workers spent in the block "
        "tasks (all threads of a worker), a figure that does not depend on how busy the machine is; "
        "M voxel per CPU s = volume voxels / block CPU s.",
    ]
    text = "\n".join(lines) + "\n"
    if append and path.is_file():
        text = path.read_text().rstrip() + "\n\n" + text
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
