"""glibc malloc thresholds (embseg.allocator): freed large buffers reused where a run's working
set repeats, glibc's ceilings on the memory-bounded routes, nothing changed when opted out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

#: Page faults of allocating, touching and freeing two 64 MiB buffers five times, in a fresh process.
_PROBE = """
import resource, sys
import torch
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
def churn(n):
    for _ in range(n):  # two 64 MiB buffers from malloc at a time, touched, freed: a layer's input and output
        x = torch.empty(16 << 20).fill_(1.0)
        y = torch.empty(16 << 20).fill_(1.0)
        del x, y
churn(3)  # the first buffers: their pages are faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(5)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, allocator._state["policy"])
"""


def _probe(policy: str, **env: str) -> tuple[str, int, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1]), out[2]


@glibc
def test_reuse_keeps_freed_buffers_and_bounded_maps_them_anew():
    pages = (64 << 20) // 4096  # of one buffer; ten buffers are allocated
    applied, faults, policy = _probe("reuse")
    assert applied == "True" and policy == "reuse"
    assert faults < 4 * pages  # most freed buffers came back from the heap, already mapped
    applied, faults, policy = _probe("bounded")
    assert policy == "bounded"
    assert faults > 8 * pages  # every buffer mapped (and zeroed) anew
    applied, faults, policy = _probe("opted-out", EMBSEG_MALLOC="default")
    assert applied == "False" and policy == "default"
    assert faults > 8 * pages  # glibc as it is: 64 MiB is above its dynamic mmap threshold


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
    monkeypatch.setattr(allocator, "_state", {"policy": "reuse"})
    net = BranchedERFNet(2).eval()
    image = np.random.default_rng(0).random((1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        predict_raw(net, image, 2)
        predict_labels_streamed(net, image, 2, (1 / 1023, 1 / 1023), tile_shape=16, halo=8)
        predict_labels_blockwise(net, image, 2, (1 / 1023, 1 / 1023), block_shape=(16, 16), object_halo=4,
                                 context=8)
    assert calls == ["reuse", "bounded", "bounded"]
