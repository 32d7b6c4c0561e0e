"""glibc malloc thresholds (embseg.allocator): freed large buffers reused where a run's working
set repeats, glibc's ceilings on the memory-bounded routes, nothing changed when opted out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

#: Page faults per page of allocating, touching and freeing two 64 MiB buffers five times with
#: glibc's malloc, in a fresh process (torch takes its tensors from the same allocator).
_PROBE = """
import ctypes, resource, sys
from embseg import allocator
policy = sys.argv[1]
if policy == "reuse":
    print(allocator.reuse_freed_memory())
elif policy == "bounded":
    allocator.reuse_freed_memory()
    allocator.bound_freed_memory()
    print(True)
else:
    print(allocator.reuse_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 64 << 20
def buffer():
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    return pointer
def churn(n):
    for _ in range(n):  # a layer's input and output
        a, b = buffer(), buffer()
        libc.free(a)
        libc.free(b)
churn(2)  # the first buffers: their pages are faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(5)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults / (10 * size / 4096), allocator._state["policy"])
"""


def _probe(policy: str, **env: str) -> tuple[str, float, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1]), out[2]


@glibc
def test_reuse_keeps_freed_buffers_and_bounded_maps_them_anew():
    applied, faults, policy = _probe("reuse")
    assert applied == "True" and policy == "reuse"
    assert faults < 0.1  # the freed buffers came back from the heap, already mapped
    applied, faults, policy = _probe("bounded")
    assert policy == "bounded"
    assert faults > 0.9  # every buffer mapped (and zeroed) anew
    applied, faults, policy = _probe("opted-out", EMBSEG_MALLOC="default")
    assert applied == "False" and policy == "default"
    assert faults > 0.9  # glibc as it is: 64 MiB is above its dynamic mmap threshold


def test_routes_set_their_policy(monkeypatch):
    """Whole-image prediction and training reuse; the block-wise and streamed routes bound."""
    import numpy as np
    import torch

    from embseg import allocator
    from embseg.blockwise import predict_labels_blockwise
    from embseg.net import BranchedERFNet
    from embseg.predict import predict_labels_streamed, predict_raw

    calls = []
    monkeypatch.setattr(allocator, "_set", lambda policy, *args: calls.append(policy) or True)
    monkeypatch.setattr(allocator, "_state", {"policy": "reuse", "bounded": 0})
    net = BranchedERFNet(2).eval()
    image = np.random.default_rng(0).random((1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        predict_raw(net, image, 2)
        predict_labels_streamed(net, image, 2, (1 / 1023, 1 / 1023), tile_shape=16, halo=8)
        predict_labels_blockwise(net, image, 2, (1 / 1023, 1 / 1023), block_shape=(16, 16), object_halo=4,
                                 context=8)
    assert calls == ["reuse", "bounded", "bounded"]
    calls.clear()
    with allocator.bounded_memory():  # what a block's route does around its predict_raw
        assert not allocator.reuse_freed_memory()
        predict_raw(net, image, 2)
    assert calls == ["bounded"] and allocator._state["bounded"] == 0
    assert allocator.reuse_freed_memory() and calls == ["bounded", "reuse"]
