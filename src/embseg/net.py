"""Branched ERFNet for spatial embeddings, N-D (one class for 2D and 3D).

One encoder, two decoders (no skip connections). Decoder A predicts offsets and raw sigmas
(``2 * ndim`` channels, array-axis order), decoder B the seed logit (1 channel). The outputs are
concatenated along the channel axis: ``(B, 2 * ndim + 1, *S)``, the layout that
:mod:`embseg.embedding` reads.

Encoder: downsampler(C→16), downsampler(16→64), 5 × non-bottleneck-1d(64, dropout 0.03),
downsampler(64→128), 2 × [nb1d(128, dropout 0.3, dilation 2, 4, 8, 16)].
Decoder: upsampler(128→64), 2 × nb1d(64), upsampler(64→16), 2 × nb1d(16), transposed conv
(16→n, kernel 2, stride 2). The total stride is 8: every spatial size of the input must be a
multiple of 8 (:func:`embseg.predict` pads).

The network is translation-equivariant only for shifts by multiples of 8 pixels (its stride), and
each output depends on the input within :func:`receptive_field_radius` pixels per axis. Tiled
prediction therefore reproduces the whole-image raw outputs when tiles start at multiples of 8 and
keep a halo of :func:`receptive_field_halo` pixels around their core.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: Total stride of the network: input sizes must be multiples of this.
STRIDE = 8

_ENCODER_DILATIONS = (2, 4, 8, 16)


def _ops(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Conv, transposed conv, batch norm, max-pool and channel dropout classes for ``ndim``."""
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, MaxPool2d, nn.Dropout2d
    if ndim == 3:
        return Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, MaxPool3d, nn.Dropout3d
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def onednn_applies(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether a 3D (transposed) convolution of ``x`` should call oneDNN directly: CPU float32,
    zero padding, oneDNN enabled, not while tracing, compiling or exporting, not under CPU
    autocast (which direct calls would bypass).

    For a batch of one, torch's own choice of kernel (a size rule, ``N·C·D·H <= 20480``, made for
    2D) sends the coarse layers of a thin volume or small crop to its slow reference kernels
    (``slow_conv3d``), 2–3x slower there, forward and backward (``benchmarks/RESULTS.md``).
    """
    return (_direct_call_possible(x, conv) and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and not _cpu_autocast())


def _compiling() -> bool:
    """Whether torch's compiler or exporter is tracing this code."""
    checks = [getattr(torch.compiler, name, None) for name in ("is_compiling", "is_exporting")]
    return any(check is not None and check() for check in checks)


def _direct_call_possible(x: torch.Tensor, conv: nn.Module) -> bool:
    """What both direct-call rules need: a CPU input, zero padding, oneDNN enabled, not while
    tracing, compiling or exporting."""
    return (
        x.device.type == "cpu" and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and not torch.jit.is_tracing() and not _compiling()
    )


def _cpu_autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


@functools.cache
def native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU with native instructions (AMX or
    AVX512-BF16, e.g. Intel Xeon since Sapphire Rapids, AMD Zen 4; not AMD Zen 3)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def onednn_autocast_dtype(x: torch.Tensor, conv: nn.Module) -> torch.dtype | None:
    """The dtype in which a 3D convolution of ``x`` under CPU autocast should call oneDNN
    directly (bfloat16, autocast's own choice for convolutions), or None for torch's path.

    As :func:`onednn_applies` for float32: torch's size rule sends a small batch's coarse layers
    to slower kernels in bfloat16 too; direct calls took a 2x32x96² 3D training step with
    ``cpu_amp`` from 465 to 380 ms on an AVX512-BF16 CPU (``benchmarks/RESULTS.md``). The
    casts are autocast's: input, weight and bias to bfloat16, the output bfloat16, the weight's
    gradient float32.
    """
    if not (_direct_call_possible(x, conv) and _cpu_autocast() and x.dtype in (torch.float32, torch.bfloat16)
            and conv.weight.dtype == torch.float32):
        return None
    if not native_bf16():  # oneDNN's bfloat16 kernels need AVX512-BF16 / AMX; torch's path otherwise
        return None
    # This torch's oneDNN (3.x, torch 2.13, AVX512-BF16) returns non-finite bfloat16 weight gradients
    # at random for a 3-tap kernel along an axis of size 2 (128 channels: 7 of 12 random trials of
    # a 2x128x2x8x8 input; none at sizes 1 or 3-12, dilated or not, nor in float32).
    if any(k > 1 and n <= 2 for k, n in zip(conv.kernel_size, x.shape[2:], strict=False)):
        return None
    dtype = _cpu_autocast_dtype()
    return dtype if dtype == torch.bfloat16 else None


def weight_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last when ``weight`` is (a channels-last inference copy): oneDNN follows the
    input's layout, and a downsampler's concatenation with the max-pool of a one-channel input
    comes out contiguous."""
    cl = torch.channels_last_3d
    if x.dim() == 5 and weight.is_contiguous(memory_format=cl) and not weight.is_contiguous():
        return x.contiguous(memory_format=cl)
    return x


def _onednn_conv3d(conv: nn.Conv3d, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """oneDNN's convolution of ``x`` with ``conv``'s parameters, in ``dtype`` (cast, as autocast
    would) when given."""
    weight, bias = conv.weight, conv.bias
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.mkldnn_convolution(weight_layout(x, weight), weight, bias, conv.padding,
                                    conv.stride, conv.dilation, conv.groups)


class Conv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` (same parameters and state dict) that calls oneDNN directly on
    the CPU (:func:`onednn_applies`; under bfloat16 autocast :func:`onednn_autocast_dtype`), with
    autograd; elsewhere torch's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if onednn_applies(x, self):
                return _onednn_conv3d(self, x)
            dtype = onednn_autocast_dtype(x, self)
            if dtype is not None:
                return _onednn_conv3d(self, x, dtype)
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution where oneDNN is not called directly."""
        return super().forward(x)


def _relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU in place. Every caller passes a fresh output of a convolution, batch norm or
    concatenation, whose backward does not need that output (autograd's version check would
    refuse it otherwise), so training can run it in place too: one full-size tensor fewer per
    layer (3–7 % of a 2D training step and ≈ 5 % of a 2D prediction on the CPU; nothing
    measurable in 3D, ``benchmarks/RESULTS.md``)."""
    return x.relu_()


def _add_relu(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``relu(out + x)`` in ``out``'s memory (a fresh output of a convolution, batch norm or
    dropout, as for :func:`_relu`)."""
    return out.add_(x).relu_()


class AxisConv3d(Conv3d):
    """A 3D convolution whose kernel spans one axis (3×1×1, 1×3×1 or 1×1×3), a plain
    :class:`torch.nn.Conv3d` (same parameters and state dict) that runs channels-last input as a
    2D convolution.

    In channels-last memory ``(B, D, H, W, C)`` the D axis is the first axis of a
    ``(B, D, H·W)`` image and the H and W axes those of a ``(B·D, H, W)`` image, so the 1-D
    convolution is a 2D one on a view, without copies. On the CPU (float32, eager) it calls
    oneDNN's 3D kernel directly instead, as :class:`Conv3d` does (as fast as the 2D view, which
    torch's size rule can also send to a slow kernel); the view serves channels-last input
    elsewhere (traced, other devices). Other layouts take the plain 3D path. The outputs are the
    same up to float rounding.
    """

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super()._torch_forward(x)
        b, c, d, h, w = x.shape
        axis = max(range(3), key=lambda a: self.kernel_size[a])
        if axis == 0:
            view, kept = (b, d, h * w, c), 0
        else:
            view, kept = (b * d, h, w, c), axis - 1
        # The kernel, padding and dilation on the 2D view's axes (the other one of size 1).
        pick = [(self.kernel_size[axis], self.padding[axis], self.dilation[axis]) if i == kept else (1, 0, 1)
                for i in range(2)]
        weight = self.weight.reshape(self.out_channels, c, pick[0][0], pick[1][0])
        y = nn.functional.conv2d(
            x.permute(0, 2, 3, 4, 1).reshape(view).permute(0, 3, 1, 2), weight, self.bias,
            padding=(pick[0][1], pick[1][1]), dilation=(pick[0][2], pick[1][2]),
        )
        return y.permute(0, 2, 3, 1).reshape(b, d, h, w, self.out_channels).permute(0, 4, 1, 2, 3)


def pairwise_max_pool(x: torch.Tensor) -> torch.Tensor:
    """2×…×2 max-pool with stride 2 of ``(B, C, *S)`` as one maximum of the even and odd slices
    per spatial axis (odd sizes floored, as ``max_pool`` does). The same values as
    ``max_pool2d`` / ``max_pool3d`` (NaN included), without their window loop."""
    for axis in range(2, x.dim()):
        pairs = x.unfold(axis, 2, 2)
        x = torch.maximum(pairs[..., 0], pairs[..., 1])
    return x


class _PairwiseMaxPool:
    """Forward of a 2×…×2, stride-2 max-pool by :func:`pairwise_max_pool` on the CPU where it is
    faster than torch's kernel: a one-channel input (any layout: 14 → 1.3 ms for a 56×240×248
    volume, 5.6 → 0.2 ms for a 1024² image, ``benchmarks/RESULTS_analysis.md``) or a contiguous
    many-channel one; only where no gradient flows through it (autograd's maximum splits the
    gradient of ties, max-pool gives it to the first maximum), and not while tracing, scripting
    or compiling (exports keep the standard operator). Elsewhere torch's own max-pool."""

    def _pairwise(self, x: torch.Tensor) -> bool:
        if torch.jit.is_tracing() or _compiling():
            return False
        ndim = x.dim() - 2
        layout = torch.channels_last if ndim == 2 else torch.channels_last_3d
        return (
            x.device.type == "cpu"
            and _tuple(self.kernel_size, ndim) == _tuple(self.stride, ndim) == (2,) * ndim
            and _tuple(self.padding, ndim) == (0,) * ndim and _tuple(self.dilation, ndim) == (1,) * ndim
            and not self.ceil_mode and not self.return_indices
            and not (torch.is_grad_enabled() and x.requires_grad)
            and (x.shape[1] == 1 or not x.is_contiguous(memory_format=layout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._pairwise(x):
            return pairwise_max_pool(x)
        return super().forward(x)


def _tuple(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim


class MaxPool2d(_PairwiseMaxPool, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with the CPU fast path of :class:`_PairwiseMaxPool`."""


class MaxPool3d(_PairwiseMaxPool, nn.MaxPool3d):
    """:class:`torch.nn.MaxPool3d` with the CPU fast path of :class:`_PairwiseMaxPool`."""


class Downsampler(nn.Module):
    """Halve the resolution: concat(strided 3-conv (in→out−in), max-pool(input)) → BN → ReLU.

    With ``in_channels >= out_channels`` (many-channel inputs) the max-pool branch cannot fit and
    the block is a strided 3-conv (in→out) → BN → ReLU.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv, _, norm, pool, _ = _ops(ndim)
        self.pooled = in_channels < out_channels
        conv_out = out_channels - in_channels if self.pooled else out_channels
        self.conv = conv(in_channels, conv_out, 3, stride=2, padding=1, bias=True)
        self.pool = pool(2, stride=2) if self.pooled else None
        self.bn = norm(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.pool is not None:
            y = torch.cat([y, self.pool(x)], dim=1)
        return _relu(self.bn(y))


class NonBottleneck1d(nn.Module):
    """Residual block of factorised 1-D convolutions (ERFNet's non-bottleneck-1d), N-D.

    Two halves of ``ndim`` 1-D convolutions of size 3 (one per axis, in array-axis order) with ReLU
    between them and batch norm after the last one; the second half is dilated. Then channel
    dropout (if ``dropout > 0``), residual add and ReLU.
    """

    def __init__(self, ndim: int, channels: int, dropout: float, dilation: int = 1) -> None:
        super().__init__()
        conv, _, norm, _, drop = _ops(ndim)

        def axis_conv(axis: int, dil: int) -> nn.Module:
            kernel = tuple(3 if d == axis else 1 for d in range(ndim))
            padding = tuple(dil if d == axis else 0 for d in range(ndim))
            dilations = tuple(dil if d == axis else 1 for d in range(ndim))
            kind = AxisConv3d if ndim == 3 else conv
            return kind(channels, channels, kernel, padding=padding, dilation=dilations, bias=True)

        self.convs1 = nn.ModuleList(axis_conv(a, 1) for a in range(ndim))
        self.bn1 = norm(channels, eps=1e-3)
        self.convs2 = nn.ModuleList(axis_conv(a, dilation) for a in range(ndim))
        self.bn2 = norm(channels, eps=1e-3)
        self.dropout = drop(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def _half(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for i, c in enumerate(convs):
            if i:
                x = _relu(x)
            x = c(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _relu(self.bn1(self._half(self.convs1, x)))
        out = self.dropout(self.bn2(self._half(self.convs2, out)))
        return _add_relu(out, x)


class Upsampler(nn.Module):
    """Double the resolution: transposed conv (k3, s2, p1, output padding 1) → BN → ReLU."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _, conv_t, norm, _, _ = _ops(ndim)
        self.conv = conv_t(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = norm(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _relu(self.bn(self.conv(x)))


class Encoder(nn.Module):
    """Shared ERFNet encoder: input → 128 channels at stride 8."""

    def __init__(self, ndim: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [Downsampler(ndim, in_channels, 16), Downsampler(ndim, 16, 64)]
        layers += [NonBottleneck1d(ndim, 64, 0.03) for _ in range(5)]
        layers.append(Downsampler(ndim, 64, 128))
        for _ in range(2):
            layers += [NonBottleneck1d(ndim, 128, 0.3, d) for d in _ENCODER_DILATIONS]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """ERFNet decoder: 128 channels at stride 8 → ``out_channels`` at full resolution."""

    def __init__(self, ndim: int, out_channels: int) -> None:
        super().__init__()
        _, conv_t, _, _, _ = _ops(ndim)
        self.layers = nn.Sequential(
            Upsampler(ndim, 128, 64),
            NonBottleneck1d(ndim, 64, 0.0),
            NonBottleneck1d(ndim, 64, 0.0),
            Upsampler(ndim, 64, 16),
            NonBottleneck1d(ndim, 16, 0.0),
            NonBottleneck1d(ndim, 16, 0.0),
        )
        self.output_conv = conv_t(16, out_channels, 2, stride=2, padding=0, output_padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_conv(self.layers(x))


class BranchedERFNet(nn.Module):
    """Branched ERFNet: shared encoder, one decoder for offsets + sigmas, one for the seed logit.

    Parameters
    ----------
    ndim
        Number of spatial axes (2 or 3); chooses 2D or 3D convolutions, pooling, norm, dropout.
    in_channels
        Number of input image channels.
    out_channels
        Output channels of the two decoders, default ``(2 * ndim, 1)``: offsets and raw sigmas
        (array-axis order), then the seed logit. The first ``ndim`` channels of decoder A are
        initialised as offsets (weights 0, bias 0), the next ``ndim`` as sigmas (weights 0,
        bias 1); the seed decoder keeps PyTorch's default initialisation.

    Notes
    -----
    Parameter counts equal the reference (2,252,624 in 2D with one input channel, 3,690,146 in
    3D). That count includes a 1×1 encoder output convolution (``encoder_head``) that the forward
    pass never uses; it is kept, frozen (``requires_grad=False``), only so that the parameter
    count and the state-dict layout match the reference. Being frozen, optimisers and DDP ignore it.

    Examples
    --------
    >>> net = BranchedERFNet(2).eval()
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 5, 64, 64])
    """

    def __init__(self, ndim: int, in_channels: int = 1, out_channels: tuple[int, int] | None = None) -> None:
        super().__init__()
        conv, _, _, _, _ = _ops(ndim)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        out_channels = (2 * ndim, 1) if out_channels is None else tuple(out_channels)
        if len(out_channels) != 2 or min(out_channels) < 1:
            raise ValueError(f"out_channels must be two positive ints, got {out_channels}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder = Encoder(ndim, in_channels)
        self.encoder_head = conv(128, sum(out_channels), 1, bias=True)
        self.encoder_head.requires_grad_(False)
        self.decoders = nn.ModuleList(Decoder(ndim, n) for n in out_channels)
        self.init_output()

    def init_output(self) -> None:
        """Zero the offset/sigma output weights; offset bias 0, sigma bias 1."""
        out = self.decoders[0].output_conv
        n = min(2 * self.ndim, self.out_channels[0])
        with torch.no_grad():
            # ConvTranspose weights are (in, out, *kernel).
            out.weight[:, :n].zero_()
            out.bias[: min(self.ndim, n)].zero_()
            out.bias[self.ndim : n].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs ``(B, sum(out_channels), *S)`` for input ``(B, in_channels, *S)``.

        Raises
        ------
        ValueError
            If the input is not ``(B, in_channels, *S)`` with ``ndim`` spatial axes, each a
            multiple of 8.
        """
        self.check_input(x)
        features = self.encoder(x)
        return torch.cat([d(features) for d in self.decoders], dim=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise the :meth:`forward` errors for an input of the wrong shape."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.ndim)}), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % STRIDE for s in spatial):
            raise ValueError(f"spatial size {spatial} must be a multiple of {STRIDE} on every axis (pad first)")


def _layer_footprints() -> list[tuple[str, int]]:
    """Per-axis footprint of every layer, input to output: ``(kind, dilation)``."""
    layers: list[tuple[str, int]] = [("down", 0), ("down", 0)]
    layers += [("conv", 1), ("conv", 1)] * 5
    layers.append(("down", 0))
    for _ in range(2):
        for d in _ENCODER_DILATIONS:
            layers += [("conv", 1), ("conv", d)]
    for _ in range(2):
        layers.append(("up3", 0))
        layers += [("conv", 1), ("conv", 1)] * 2
    layers.append(("up2", 0))
    return layers


def receptive_field_radius(ndim: int) -> int:
    """Largest distance (pixels, per axis) from an output pixel to an input pixel that affects it.

    Exact interval arithmetic over the layers, from the output back to the input, for every output
    phase modulo 8: a size-3 convolution with dilation ``d`` maps output pixels ``[a, b]`` to
    inputs ``[a - d, b + d]``; a downsampler (3-conv stride 2 padding 1, and 2-max-pool) to
    ``[2a - 1, 2b + 1]``; the upsampler (transposed 3-conv, stride 2, padding 1) to
    ``[ceil((a - 1) / 2), floor((b + 1) / 2)]``; the output transposed 2-conv (stride 2) to
    ``[floor(a / 2), floor(b / 2)]``. The blocks are the same on every axis, so the radius is the
    same for 2D and 3D: 622 pixels. ``tests/test_net.py`` checks it empirically (the gradient of one
    output pixel with respect to the input is non-zero exactly up to this distance).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    layers = _layer_footprints()
    radius = 0
    base = 1 << 16  # far from 0, a multiple of 8, so floor/ceil behave as on any interior pixel
    for phase in range(STRIDE):
        q = base + phase
        lo, hi = q, q
        for kind, d in reversed(layers):
            if kind == "conv":
                lo, hi = lo - d, hi + d
            elif kind == "down":
                lo, hi = 2 * lo - 1, 2 * hi + 1
            elif kind == "up3":
                lo, hi = -((1 - lo) // 2), (hi + 1) // 2
            else:  # up2
                lo, hi = lo // 2, hi // 2
        radius = max(radius, q - lo, hi - q)
    return radius


def receptive_field_halo(ndim: int) -> int:
    """Conservative tile halo (pixels, per axis) for exact tiled prediction: 624.

    :func:`receptive_field_radius` (622) rounded up to a multiple of 8. With tiles starting at
    multiples of 8 (the network stride) and this halo around each core, the core of a tile's raw
    output equals the whole-image raw output in eval mode (measured: identical to the last bit, 2D
    and 3D; ``tests/test_net.py``).

    It is large because the dilated encoder blocks at stride 8 dominate. The influence of far
    pixels decays quickly in practice: at random initialisation a halo of 144 pixels already gave
    a relative deviation below 1e-4 and 288 pixels below 1e-6 (2D strips, two seeds). A trained
    network's decay differs, so a smaller halo is a speed/accuracy trade-off for the caller.
    """
    r = receptive_field_radius(ndim)
    return -(-r // STRIDE) * STRIDE
