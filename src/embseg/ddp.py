"""Multi-process training with DistributedDataParallel: process group, rank shares, a launcher.

Two ways to start N training processes, both through ``embseg train``'s flags:

* ``embseg train --nproc N ...`` spawns N local processes (:func:`launch`);
* ``torchrun --nproc-per-node N -m embseg.training ...`` (also across machines: torchrun's
  ``--nnodes``, ``--rdzv-endpoint``); :func:`init_from_env` reads torchrun's environment.

Backend NCCL on GPUs (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on CPUs. Each rank
draws a disjoint share of every epoch's samples (:class:`RankShare`: sample ``rank + k * N``),
so an epoch is the same set of samples as in one process and ``batch_size`` is per process
(the global batch is N times larger). Gradients are averaged over ranks by DDP, so every rank
holds the same weights after every step. Rank 0 alone validates, writes checkpoints, the model,
the log and figures; decisions that end the loop (time limit, callback) are taken by rank 0 and
broadcast, so all ranks always run the same number of steps.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

#: Collective operations wait this long (rank 0 validates while the others wait).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0


def context(device: str | None = "auto") -> DistContext | None:
    """The current process group (None when not distributed or of one process).

    ``device``: ``auto``/``cuda`` give ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    wants_cuda = device in (None, "auto") or str(device).startswith("cuda")
    dev = torch.device(f"cuda:{local}") if wants_cuda and torch.cuda.is_available() else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev)


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Returns True if a group was initialised here.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def leave() -> None:
    """Leave the process group (after training)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RankShare(Dataset):
    """The share of a dataset one rank draws: items ``rank, rank + N, rank + 2N, ...``.

    Every rank gets ``len(dataset) // N`` items (the few left over are skipped), so ranks run
    equally many steps. ``set_epoch`` is passed on to the dataset.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(self.dataset) // self.world_size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[self.rank + index * self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def rank_share(dataset: Any, ctx: DistContext | None) -> Any:
    """``dataset`` itself in one process, else this rank's :class:`RankShare`."""
    return dataset if ctx is None else RankShare(dataset, ctx.rank, ctx.world_size)


def wrap(net: torch.nn.Module, ctx: DistContext | None) -> torch.nn.Module:
    """``net`` in DistributedDataParallel (rank 0's weights are broadcast to all ranks here)."""
    if ctx is None:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def no_sync(module: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of this backward (gradient accumulation) when ``skip``."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def barrier(ctx: DistContext | None) -> None:
    """Wait for all ranks."""
    if ctx is not None:
        dist.barrier()


def rank0_decides(flag: bool, ctx: DistContext | None) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    if ctx is None:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(ctx))
    dist.broadcast(value, src=0)
    return bool(value.item())


def mean_over_ranks(values: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """Element-wise mean of ``values`` over ranks (CPU result)."""
    if ctx is None:
        return values
    buffer = values.detach().to(_collective_device(ctx), torch.float64).clone()
    dist.all_reduce(buffer)
    return (buffer / ctx.world_size).cpu()


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# local launcher


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, fn: Callable, nproc: int, port: int, args: Sequence[Any], threads: int | None) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
    })
    if threads:
        torch.set_num_threads(threads)
    init_from_env()
    try:
        fn(*args)
    finally:
        leave()


def launch(fn: Callable, nproc: int, args: Sequence[Any] = (), threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes forming one process group.

    ``fn`` must be importable (a module-level function). ``threads``: torch threads per process
    (default: the CPU cores shared out among the processes when they run on the CPU). An
    exception in any process is raised here after the others are stopped.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if threads is None and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // nproc)
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, nproc, free_port(), tuple(args), threads), nprocs=nproc, join=True)


def train_worker(config: Any, resume: bool, overwrite: bool, progress: bool) -> None:
    """One rank of ``embseg train --nproc N``."""
    from embseg.training import train

    ctx = context(config.device)
    train(config, resume=resume, overwrite=overwrite, progress=progress and (ctx is None or ctx.is_main))
