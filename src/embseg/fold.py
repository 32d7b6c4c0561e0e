"""Batch-norm folding: the inference form of :class:`~embseg.net.BranchedERFNet`.

In eval mode a batch norm is a fixed per-channel affine map, and each one in the network
follows a (transposed) convolution, so it can be folded into that convolution's weights and
bias. Prediction (:mod:`embseg.predict`) runs such a copy. On the CPU, its 3D (transposed)
convolutions call oneDNN directly (:func:`use_onednn_3d`).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
from torch import nn

from embseg.net import (
    BranchedERFNet,
    Downsampler,
    NonBottleneck1d,
    Upsampler,
    onednn_applies,
    weight_layout,
)


class _ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a folded batch norm with no convolution before it."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.reshape(shape), x, self.scale.reshape(shape))


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift of an eval-mode batch norm: ``bn(x) == x * scale + shift``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_into(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``conv(x) * scale + shift`` (per output channel) the convolution itself."""
    transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    out_axis = 1 if transposed else 0  # ConvTranspose weights are (in, out, *kernel)
    shape = [1] * conv.weight.dim()
    shape[out_axis] = -1
    conv.weight.copy_(conv.weight * scale.reshape(shape))
    conv.bias.copy_(conv.bias * scale + shift)


@torch.no_grad()
def fold_batchnorm(net: BranchedERFNet) -> BranchedERFNet:
    """An inference copy of ``net`` with every batch norm folded into the layer before it.

    In eval mode a batch norm is a fixed per-channel affine map, and each one in the network
    follows a (transposed) convolution, so it can be folded into that convolution's weights and
    bias: one pass over the activations fewer per block (a few % of a CPU prediction,
    ``benchmarks/RESULTS.md``). A downsampler's max-pool channels keep their affine map as a
    small separate step. Outputs equal ``net.eval()``'s up to float rounding (≈ 1e-6).

    Parameters
    ----------
    net
        The network; it is not modified (the copy is made on its device).

    Returns
    -------
    BranchedERFNet
        A copy in eval mode, for inference only: its batch norms are identities (training it
        would train something else), so its state dict is not a model file's.
    """
    fused = copy.deepcopy(net).eval()
    for block in fused.modules():
        if isinstance(block, NonBottleneck1d):
            _fold_into(block.convs1[-1], *_bn_affine(block.bn1))
            _fold_into(block.convs2[-1], *_bn_affine(block.bn2))
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
        elif isinstance(block, Upsampler):
            _fold_into(block.conv, *_bn_affine(block.bn))
            block.bn = nn.Identity()
        elif isinstance(block, Downsampler):
            scale, shift = _bn_affine(block.bn)
            n = block.conv.out_channels
            _fold_into(block.conv, scale[:n], shift[:n])
            if block.pool is not None:
                block.pool = nn.Sequential(block.pool, _ChannelAffine(scale[n:], shift[n:]))
            block.bn = nn.Identity()
    return fused


# ------------------------------------------------------------------ oneDNN for 3D on the CPU
# The network's own 3D convolutions call oneDNN directly on the CPU (:class:`embseg.net.Conv3d`);
# its transposed ones cannot in training (oneDNN's transposed convolution operator has no
# autograd), so the inference copy swaps them for the class below. For a batch of one, torch's
# size rule (``N * C * D * H <= 20480``, made for 2D) would send the coarse layers of a thin
# volume or small tile to its slow reference kernels (slow_conv3d, slow_conv_transpose3d), whose
# outputs also lose the channels-last layout so that every later layer follows: a 32x96x96
# volume ran at ~30 GFLOP/s instead of ~115 (``benchmarks/RESULTS.md``).


class _OneDNNConvTranspose3d(nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` run by oneDNN's transposed convolution (inference, CPU
    float32), when this torch build has the operator (checked once, :func:`_transpose_op`)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        op = _transpose_op()
        if op is None or output_size is not None or torch.is_grad_enabled() or not onednn_applies(x, self):
            return super().forward(x, output_size)
        return op(weight_layout(x, self.weight), self.weight, self.bias, list(self.padding),
                  list(self.output_padding), list(self.stride), list(self.dilation), self.groups, "none", [], "")


@functools.cache
def _transpose_op():
    """oneDNN's transposed convolution (``torch.ops.mkldnn._convolution_transpose_pointwise``, an
    internal operator of torch's compiler), or None when this build lacks it or it does not give
    ``conv_transpose3d``'s result on a probe."""
    try:
        op = torch.ops.mkldnn._convolution_transpose_pointwise
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(1, 4, 3, 5, 4, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        w, b = torch.rand(4, 3, 3, 3, 3, generator=gen), torch.rand(3, generator=gen)
        with torch.no_grad():
            got = op(x, w, b, [1, 1, 1], [1, 1, 1], [2, 2, 2], [1, 1, 1], 1, "none", [], "")
            want = nn.functional.conv_transpose3d(x, w, b, stride=2, padding=1, output_padding=1)
        return op if got.shape == want.shape and torch.allclose(got, want, atol=1e-5) else None
    except (AttributeError, RuntimeError):
        return None


def use_onednn_3d(net: nn.Module) -> nn.Module:
    """Make the 3D transposed convolutions of an inference network call oneDNN directly on the
    CPU (float32, autograd off); everywhere else they run as before (its other convolutions do
    so themselves, :class:`embseg.net.Conv3d`). In place; returns ``net``.

    Same parameters, state dict and results (to float rounding, ≈ 1e-6): only the kernel choice
    changes, for the layers where torch's size rule would take its slow reference kernels.
    """
    for module in net.modules():
        if type(module) is nn.ConvTranspose3d:
            module.__class__ = _OneDNNConvTranspose3d
    return net


#: Folded copies of live networks: net -> (state key, copy); an entry goes with its network.
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _state_key(net: nn.Module, device: torch.device, memory_format: torch.memory_format) -> tuple | None:
    """Changes whenever a parameter or buffer of ``net`` is replaced or modified in place
    (optimizer steps, ``load_state_dict``, device moves bump a tensor's version or move it).
    ``None`` when that cannot be told (tensors made in inference mode have no version counter)."""
    state = [*net.parameters(), *net.buffers()]
    if any(t.is_inference() for t in state):
        return None
    tensors = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in state)
    return (str(device), str(memory_format), tensors)


def folded_for_inference(
    net: BranchedERFNet, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format
) -> BranchedERFNet:
    """:func:`fold_batchnorm` of ``net`` on ``device`` in ``memory_format``, cached per network.

    The copy (≈ 40 ms for the 2D network on the CPU, 4–15 % of predicting a megapixel image or a
    small volume) is made again only when a parameter or batch-norm statistic of ``net`` has
    changed since (for instance by a training step), so predicting a folder of images with one
    model folds it once; a network made in inference mode (no version counters) is folded on
    every call. ``net`` itself is never modified.
    """
    device = torch.device(device)
    key = _state_key(net, device, memory_format)
    cached = _FOLDED.get(net)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    fused = fold_batchnorm(net).to(device)
    if memory_format != torch.contiguous_format:
        fused = fused.to(memory_format=memory_format)
    if device.type == "cpu":
        use_onednn_3d(fused)
    if key is not None:
        _FOLDED[net] = (key, fused)
    return fused
