"""Time and FLOP rate of each block of our folded inference network on the CPU, one forward.

    .venv/bin/python benchmarks/layer_profile.py --ndim 3 --shape 56,240,248   # the predict_3d_trained volume, padded
    .venv/bin/python benchmarks/layer_profile.py --ndim 2 --shape 1024,1024

Random weights (the time does not depend on them), the inference copy that ``predict_raw`` runs
(batch norms folded, channels-last, oneDNN post-ops in 3D), 2 threads, freed buffers kept in the
heap as prediction keeps them (:mod:`embseg.allocator`). Each block's FLOPs are counted from its
(transposed) convolutions (2 per multiply-add, every kernel tap, padding included); the rate is
those FLOPs over the block's median time of ``--reps`` forwards. What is not in a block (the two
output layers, the input check) is the remainder.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from embseg.allocator import reuse_freed_memory
from embseg.fold import folded_for_inference
from embseg.net import BranchedERFNet, Downsampler, NonBottleneck1d, Upsampler

BLOCKS = (NonBottleneck1d, Downsampler, Upsampler)


def conv_flops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """FLOPs of one (transposed) convolution call: 2 per multiply-add, every kernel tap."""
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 2.0 * x.numel() * module.weight[0].numel()
    return 2.0 * out.numel() * module.weight[0].numel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ndim", type=int, default=3, choices=(2, 3))
    parser.add_argument("--shape", default="56,240,248")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    reuse_freed_memory()
    shape = tuple(int(s) for s in args.shape.split(","))
    layout = torch.channels_last if args.ndim == 2 else torch.channels_last_3d
    net = folded_for_inference(BranchedERFNet(args.ndim).eval(), "cpu", layout)
    x = torch.randn(1, 1, *shape).contiguous(memory_format=layout)

    times: dict[str, list[float]] = defaultdict(list)
    flops: dict[str, float] = defaultdict(float)

    def start(module, _inputs):
        module._start = time.perf_counter()

    def stop(module, _inputs, _output):
        times[module._name].append(time.perf_counter() - module._start)

    def count(module, inputs, output):
        flops[module._block] += conv_flops(module, inputs[0], output)

    for name, module in net.named_modules():
        if isinstance(module, BLOCKS):
            module._name = f"{name} ({next(c for c in type(module).__mro__ if c in BLOCKS).__name__})"
            module.register_forward_pre_hook(start)
            module.register_forward_hook(stop)
    totals = []
    with torch.inference_mode():
        # FLOPs: one forward of the plain (unfolded, unfused) network, whose convolutions run as
        # modules; the folded copy's fused blocks call oneDNN on their weights directly.
        plain = BranchedERFNet(args.ndim).eval()
        for name, module in plain.named_modules():
            if isinstance(module, BLOCKS):
                for child in module.modules():
                    if isinstance(child, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                        child._block = f"{name} ({type(module).__name__})"
                        child.register_forward_hook(count)
        plain(x)
        # the output layers: kernel-2 stride-2 transposed convolutions, one multiply-add per
        # output voxel, output channel and input channel
        heads = sum(2.0 * x.numel() * d.output_conv.in_channels * d.output_conv.out_channels for d in plain.decoders)
        net(x)
        times.clear()
        for _ in range(args.reps):
            begin = time.perf_counter()
            net(x)
            totals.append(time.perf_counter() - begin)
    total_flops = sum(flops.values()) + heads
    median_total = float(np.median(totals))
    print(f"{args.ndim}D forward of 1x1x{'x'.join(map(str, shape))}: median {median_total * 1e3:.1f} ms, "
          f"{total_flops / 1e9:.1f} GFLOP ({total_flops / 1e9 / (x.numel() / 1e6):.1f} per M voxels), "
          f"{total_flops / median_total / 1e9:.0f} GFLOP/s overall")
    in_blocks = 0.0
    rows = sorted(times, key=lambda k: -np.median(times[k]))
    for name in rows:
        t = float(np.median(times[name]))
        in_blocks += t
        print(f"{t * 1e3:8.1f} ms  {flops[name] / 1e9:6.2f} GFLOP  {flops[name] / t / 1e9:5.0f} GFLOP/s  {name}")
    print(f"{(median_total - in_blocks) * 1e3:8.1f} ms  {heads / 1e9:6.2f} GFLOP         remainder (output layers, input check)")


if __name__ == "__main__":
    main()
