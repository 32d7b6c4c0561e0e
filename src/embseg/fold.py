"""Batch-norm folding: the inference form of :class:`~embseg.net.BranchedERFNet`.

In eval mode a batch norm is a fixed per-channel affine map, and each one in the network
follows a (transposed) convolution, so it can be folded into that convolution's weights and
bias. Prediction (:mod:`embseg.predict`) runs such a copy. On the CPU, its 3D (transposed)
convolutions call oneDNN directly, with the ReLUs and residual adds that follow them as oneDNN
post-ops (:func:`use_onednn_3d`).
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
        if _transpose_op() is None or output_size is not None or torch.is_grad_enabled() or not onednn_applies(x, self):
            return super().forward(x, output_size)
        return _onednn_transposed(self, x, "none")


def _onednn_transposed(conv: nn.Module, x: torch.Tensor, post_op: str) -> torch.Tensor:
    """oneDNN's transposed convolution of ``x`` with ``conv``'s parameters and a unary post-op
    (``"none"`` or ``"relu"``); the operator must exist (:func:`_transpose_op`)."""
    return _transpose_op()(weight_layout(x, conv.weight), conv.weight, conv.bias, list(conv.padding),
                           list(conv.output_padding), list(conv.stride), list(conv.dilation), conv.groups,
                           post_op, [], "")


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


@functools.cache
def _pointwise_ops() -> tuple | None:
    """oneDNN's convolution with a ReLU post-op and with a residual-add + ReLU post-op
    (``torch.ops.mkldnn._convolution_pointwise`` and its ``.binary`` overload, internal operators
    of torch's compiler), or None when this build lacks them or they do not give
    ``relu(conv3d(x) [+ other])`` on a probe."""
    try:
        unary = torch.ops.mkldnn._convolution_pointwise.default
        binary = torch.ops.mkldnn._convolution_pointwise.binary
        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last_3d
        x = (torch.rand(1, 4, 3, 5, 4, generator=gen) - 0.5).contiguous(memory_format=cl)
        other = (torch.rand(1, 3, 3, 5, 4, generator=gen) - 0.5).contiguous(memory_format=cl)
        w = (torch.rand(3, 4, 3, 1, 1, generator=gen) - 0.5).contiguous(memory_format=cl)
        b = torch.rand(3, generator=gen) - 0.5
        with torch.no_grad():
            conv = nn.functional.conv3d(x, w, b, padding=(1, 0, 0))
            got = unary(x, w, b, [1, 0, 0], [1, 1, 1], [1, 1, 1], 1, "relu", [], "")
            got_sum = binary(x, other, w, b, [1, 0, 0], [1, 1, 1], [1, 1, 1], 1, "add", 1.0, "relu", [], "")
        ok = torch.allclose(got, conv.relu(), atol=1e-5) and torch.allclose(got_sum, (conv + other).relu(), atol=1e-5)
        return (unary, binary) if ok else None
    except (AttributeError, RuntimeError):
        return None


def _conv_args(conv: nn.Module) -> tuple:
    return conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _conv_relu(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` in one oneDNN call."""
    x = weight_layout(x, conv.weight)
    return _pointwise_ops()[0](x, *_conv_args(conv), "relu", [], "")


def _conv_add_relu(conv: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x) + other)`` in one oneDNN call."""
    x = weight_layout(x, conv.weight)
    return _pointwise_ops()[1](x, weight_layout(other, conv.weight), *_conv_args(conv), "add", 1.0, "relu", [], "")


def _fuses(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether the post-op forms below apply: a 5-D input where oneDNN is called directly
    (:func:`embseg.net.onednn_applies`), autograd off, and this build has the operators."""
    return (x.dim() == 5 and not torch.is_grad_enabled() and onednn_applies(x, conv)
            and _pointwise_ops() is not None)


class _FusedNonBottleneck1d(NonBottleneck1d):
    """A folded residual block (batch norms already in the convolutions, eval mode) whose
    ReLUs and final residual add + ReLU run as post-ops of the convolution before them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not _fuses(x, self.convs1[0]):
            return super().forward(x)
        y = x
        for conv in [*self.convs1, *self.convs2[:-1]]:
            y = _conv_relu(conv, y)
        return _conv_add_relu(self.convs2[-1], y, x)


class _FusedDownsampler(Downsampler):
    """A folded downsampler whose ReLU runs as the strided convolution's post-op (and on the
    max-pool channels, which ReLU does not mix with the others, separately)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not _fuses(x, self.conv):
            return super().forward(x)
        y = _conv_relu(self.conv, x)
        if self.pool is not None:
            parts = [y, self.pool(x).relu_()]
            # Into the convolution's layout (a one-channel input's max-pool is both layouts at
            # once, and torch.cat would then make the whole output contiguous).
            shape = (y.shape[0], y.shape[1] + parts[1].shape[1], *y.shape[2:])
            cl = torch.channels_last_3d
            layout = cl if y.is_contiguous(memory_format=cl) else torch.contiguous_format
            y = torch.cat(parts, dim=1, out=torch.empty(shape, dtype=y.dtype).contiguous(memory_format=layout))
        return y


class _FusedUpsampler(Upsampler):
    """A folded upsampler whose ReLU runs as the transposed convolution's post-op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or _transpose_op() is None or not _fuses(x, self.conv):
            return super().forward(x)
        return _onednn_transposed(self.conv, x, "relu")


_FUSED = {NonBottleneck1d: _FusedNonBottleneck1d, Downsampler: _FusedDownsampler, Upsampler: _FusedUpsampler}


def use_onednn_3d(net: nn.Module) -> nn.Module:
    """Make the 3D transposed convolutions of a folded inference network (:func:`fold_batchnorm`)
    call oneDNN directly on the CPU (float32, autograd off), and its ReLUs and residual adds run
    as oneDNN post-ops of the (transposed) convolution before them; everywhere else they run as
    before (its other convolutions call oneDNN themselves, :class:`embseg.net.Conv3d`). In place;
    returns ``net``.

    Same parameters, state dict and results (to float rounding, ≈ 1e-6): the kernel choice
    changes for the layers where torch's size rule would take its slow reference kernels, and
    the post-ops save a pass over each activation (≈ 10 % of a 3D prediction,
    ``benchmarks/RESULTS.md``). 2D networks are left as they are (the post-ops were measured no
    faster there).
    """
    for module in net.modules():
        if type(module) is nn.ConvTranspose3d:
            module.__class__ = _OneDNNConvTranspose3d
    for module in net.modules():
        fused = _FUSED.get(type(module))
        conv = getattr(module, "conv", None) or getattr(module, "convs1", [None])[0]
        if fused is not None and isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)):
            norms = [getattr(module, name, None) for name in ("bn", "bn1", "bn2")]
            if all(n is None or isinstance(n, nn.Identity) for n in norms):  # folded
                module.__class__ = fused
    return net


def transposed_stride2_into(conv: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``conv(x)`` into ``out`` for a transposed convolution of kernel 2 and stride 2 (no
    padding, dilation or groups), as one matrix product.

    Each input pixel then feeds its own 2×…×2 block of output pixels: ``(C_out · 2^D, C_in)``
    weights times the ``(C_in, pixels)`` input give every block at once, and one strided copy
    puts them in place. For a channels-last ``x`` the product reads it as it lies, and ``out``
    may be any view (a channel slice of a contiguous map): no concatenation and no layout
    conversion of the full-resolution output afterwards. Same sums as the convolution.

    Parameters
    ----------
    conv
        A :class:`torch.nn.ConvTranspose2d` / ``3d`` with ``kernel_size=2, stride=2``.
    x
        ``(B, C_in, *S)``.
    out
        ``(B, C_out, *(2 * S))``, written in place.
    """
    ndim = x.dim() - 2
    b, c_in, *spatial = x.shape
    c_out, k = conv.out_channels, 2**ndim
    weight = conv.weight.reshape(c_in, c_out * k).t()  # rows: (channel, offset per axis)
    pixels = x.permute(0, *range(2, ndim + 2), 1).reshape(-1, c_in)  # a view when channels-last
    blocks = torch.mm(weight, pixels.t()).view(c_out, *[2] * ndim, b, *spatial)  # (c_out·k, B·S)
    # out[b, c, 2i + di, 2j + dj, ...] = blocks[c, di, dj, ..., b, i, j, ...] + bias[c]: the
    # bias is added in the same pass that puts the blocks in place.
    order = [ndim + 1, 0] + [a for i in range(ndim) for a in (ndim + 2 + i, 1 + i)]
    split = [b, c_out] + [n for s in spatial for n in (s, 2)]
    torch.add(blocks.permute(order), conv.bias.view(1, c_out, *[1] * (2 * ndim)), out=out.view(split))


def _direct_output(conv: nn.Module) -> bool:
    return (tuple(conv.kernel_size) == tuple(conv.stride) == (2,) * len(conv.kernel_size)
            and not any(conv.padding) and not any(conv.output_padding) and conv.groups == 1
            and all(d == 1 for d in conv.dilation) and conv.bias is not None)


class _DirectOutputERFNet(BranchedERFNet):
    """A folded network whose two decoders write their final transposed convolutions straight
    into one contiguous output (:func:`transposed_stride2_into`) instead of concatenating two
    channels-last maps and converting the result: on the CPU (float32, autograd off) ≈ 60 ms of
    a 3D prediction of 3 M voxels (``benchmarks/RESULTS.md``). The output is the same, contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = [d.output_conv for d in self.decoders]
        if self.training or torch.is_grad_enabled() or not onednn_applies(x, heads[0]):
            return super().forward(x)
        self.check_input(x)
        features = self.encoder(x)
        out = torch.empty((x.shape[0], sum(self.out_channels), *x.shape[2:]), dtype=x.dtype, device=x.device)
        start = 0
        for decoder, head in zip(self.decoders, heads, strict=True):
            transposed_stride2_into(head, decoder.layers(features), out[:, start : start + head.out_channels])
            start += head.out_channels
        return out


def direct_output(net: nn.Module) -> nn.Module:
    """Make a folded inference :class:`~embseg.net.BranchedERFNet` write its output as
    :class:`_DirectOutputERFNet` does (on the CPU; elsewhere it runs as before). In place;
    returns ``net``."""
    if type(net) is BranchedERFNet and all(_direct_output(d.output_conv) for d in net.decoders):
        net.__class__ = _DirectOutputERFNet
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
        direct_output(use_onednn_3d(fused))
    if key is not None:
        _FOLDED[net] = (key, fused)
    return fused
