"""Reuse of freed large buffers by glibc's malloc, where a run's working set repeats.

Torch takes its CPU tensors from ``malloc``. glibc serves every allocation above its mmap
threshold (128 KiB, raised dynamically up to 32 MiB) with a fresh ``mmap`` and unmaps it when it
is freed, and hands free memory at the top of its heap back to the kernel above its trim
threshold. A network forward that allocates and frees tens of MB per layer then takes a page
fault, and the kernel zeroes a page, for every 4 KiB of every activation, on every call
(``benchmarks/RESULTS.md``: ≈ 20 % of a repeated 3D prediction on the CPU).

:func:`reuse_freed_memory` raises both thresholds, so that freed buffers stay in the heap for the
next layer and the next call; training and whole-image prediction (:func:`embseg.predict.predict_raw`)
turn it on: their working set is the same from step to step. The process then keeps the memory
of its largest call (as glibc does for small allocations anyway); :func:`release_freed_memory`
gives the free pages back (``malloc_trim``), which the napari plugin does when a job ends.
The memory-bounded routes (tiled prediction that clusters block by block or streams
candidates, a dask worker's block) run inside :func:`bounded_memory` instead, glibc's own ceilings: with buffers of every
size in one heap, the holes left between blocks made their peak grow with the volume
(2.3 GB instead of 1.3 GB of working memory for the 16x volume of the memory benchmark).

Set ``EMBSEG_MALLOC=default`` to leave malloc as it is. Elsewhere than glibc (macOS, Windows,
musl) nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (larger ones, e.g. a whole volume, are still
#: mapped on their own and unmapped when freed).
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap is kept up to this (the largest value ``mallopt`` takes).
TRIM_THRESHOLD = 2**31 - 1
#: glibc's own ceilings of its dynamic thresholds (64-bit): what :func:`bound_freed_memory` sets.
BOUNDED_MMAP_THRESHOLD = 32 << 20
BOUNDED_TRIM_THRESHOLD = 64 << 20

_state = {"policy": "default", "bounded": 0}
_lock = threading.Lock()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if os.environ.get("EMBSEG_MALLOC", "").lower() == "default":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _set(policy: str, mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    if _state["policy"] != policy:
        if not (libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)):
            return False
        _state["policy"] = policy
    return True


def reuse_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (:data:`MMAP_THRESHOLD`,
    :data:`TRIM_THRESHOLD`): freed buffers up to 1 GiB stay in the heap.

    Returns
    -------
    bool
        Whether they are set: False where the C library is not glibc or
        ``EMBSEG_MALLOC=default`` is set.
    """
    with _lock:
        if _state["bounded"]:  # inside a memory-bounded route (:func:`bounded_memory`)
            return False
        return _set("reuse", MMAP_THRESHOLD, TRIM_THRESHOLD)


def bound_freed_memory() -> None:
    """Undo :func:`reuse_freed_memory`: glibc's own ceilings for its thresholds (32 MiB mmap,
    64 MiB trim), so that buffers above 32 MiB are mapped on their own and unmapped when freed,
    and the free pages the heap holds go back to the kernel. Nothing changes where the
    thresholds were never raised (glibc's dynamic ones stay below these ceilings)."""
    with _lock:
        if _state["policy"] == "reuse" and _set("bounded", BOUNDED_MMAP_THRESHOLD, BOUNDED_TRIM_THRESHOLD):
            _glibc().malloc_trim(0)


@contextlib.contextmanager
def bounded_memory() -> Iterator[None]:
    """A memory-bounded route: :func:`bound_freed_memory`, and :func:`reuse_freed_memory` is
    a no-op until the (outermost) block ends, whatever the route calls inside (a block's
    ``predict_raw``). The thresholds stay bounded afterwards, until something raises them."""
    bound_freed_memory()
    with _lock:
        _state["bounded"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["bounded"] -= 1


def release_freed_memory() -> None:
    """Give the heap's free pages back to the kernel (``malloc_trim(0)``), where
    :func:`reuse_freed_memory` raised the thresholds."""
    libc = _glibc()
    if libc is not None and _state["policy"] == "reuse":
        libc.malloc_trim(0)
