"""Tests of the branched ERFNet: size, layout, initialisation, stride and receptive field."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embseg.fold import fold_batchnorm
from embseg.net import (
    BranchedERFNet,
    Downsampler,
    NonBottleneck1d,
    Upsampler,
    receptive_field_halo,
    receptive_field_radius,
)

torch.set_num_threads(1)


def n_params(net: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def randomise_outputs(net: BranchedERFNet, seed: int = 0) -> BranchedERFNet:
    """Give the zero-initialised offset/sigma output weights random values (for RF tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in net.decoders:
            d.output_conv.weight.copy_(0.5 * torch.randn(d.output_conv.weight.shape, generator=g))
    return net


@pytest.mark.parametrize(("ndim", "expected"), [(2, 2_252_624), (3, 3_690_146)])
def test_parameter_counts_match_reference(ndim, expected):
    net = BranchedERFNet(ndim)
    assert n_params(net) == expected
    # The unused encoder head (128 -> 2 * ndim + 1, 1x1) is frozen, so nothing trainable is unused.
    head = 128 * (2 * ndim + 1) + 2 * ndim + 1
    assert n_params(net, trainable_only=True) == expected - head


def test_three_input_channels():
    net = BranchedERFNet(2, in_channels=3)
    # Only the first downsampler's conv changes: (16 - C) * C * 9 + (16 - C) parameters.
    assert n_params(net) == 2_252_624 - (15 * 1 * 9 + 15) + (13 * 3 * 9 + 13)
    out = net.eval()(torch.randn(2, 3, 32, 40))
    assert out.shape == (2, 5, 32, 40)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(2, 1, 32, 40))
    # More input channels than the first block's 16 outputs: no pooled branch, still works.
    many = BranchedERFNet(2, in_channels=20).eval()
    assert many(torch.randn(1, 20, 16, 16)).shape == (1, 5, 16, 16)


@pytest.mark.parametrize(("ndim", "shape"), [(2, (64, 64)), (3, (16, 32, 32))])
def test_output_shape_and_init(ndim, shape):
    torch.manual_seed(0)
    net = BranchedERFNet(ndim)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    assert all(not isinstance(m, nn.Conv2d | nn.Conv3d) or isinstance(m, conv) for m in net.modules())
    x = torch.randn(2, 1, *shape)
    for mode in (net.train(), net.eval()):
        out = mode(x)
        assert out.shape == (2, 2 * ndim + 1, *shape)
        # At init: offsets 0 and sigmas 1 everywhere; the seed logit varies.
        assert torch.all(out[:, :ndim] == 0)
        assert torch.all(out[:, ndim : 2 * ndim] == 1)
        assert out[:, 2 * ndim].std() > 0
    weight = net.decoders[0].output_conv.weight
    assert torch.all(weight == 0)
    assert torch.all(net.decoders[0].output_conv.bias == torch.tensor([0.0] * ndim + [1.0] * ndim))
    assert net.decoders[1].output_conv.weight.abs().sum() > 0


@pytest.mark.parametrize(("ndim", "shape"), [(2, (64, 60)), (2, (12, 64)), (3, (16, 32, 20))])
def test_size_not_multiple_of_8_raises(ndim, shape):
    net = BranchedERFNet(ndim)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.zeros(1, 1, *shape))


def test_invalid_ndim_raises():
    with pytest.raises(ValueError):
        BranchedERFNet(4)
    with pytest.raises(ValueError):
        receptive_field_halo(1)


def test_every_trainable_parameter_gets_a_gradient():
    net = BranchedERFNet(2).train()
    out = net(torch.randn(2, 1, 32, 32))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_channels_last_gives_same_output():
    torch.manual_seed(1)
    net = randomise_outputs(BranchedERFNet(2)).eval()
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        out = net_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_receptive_field_radius_is_exact():
    """The gradient of one output pixel w.r.t. the input reaches exactly the computed radius."""
    torch.manual_seed(2)
    net = randomise_outputs(BranchedERFNet(2)).eval()
    radius = receptive_field_radius(2)
    assert radius == 622
    width, centre = 2048, 1024
    # One sample per output phase modulo 8 (samples are independent in eval mode).
    x = torch.randn(8, 1, 16, width, requires_grad=True)
    out = net(x)
    phases = torch.arange(8)
    out[phases, :, 8, centre + phases].sum().backward()
    support = x.grad[:, 0].abs().sum(1) > 0  # (8, width)
    reach = []
    for p in range(8):
        nz = torch.nonzero(support[p]).squeeze(1)
        reach.append(max(centre + p - int(nz.min()), int(nz.max()) - centre - p))
    assert max(reach) == radius
    assert receptive_field_halo(2) == receptive_field_halo(3) == 624


@pytest.mark.parametrize("ndim", [2, 3])
def test_tile_with_halo_reproduces_whole_image(ndim):
    torch.manual_seed(3)
    net = randomise_outputs(BranchedERFNet(ndim), seed=ndim).eval()
    halo = receptive_field_halo(ndim)
    # A strip: the halo is needed along the last axis only; other axes are covered whole.
    x = torch.randn((1, 1) + (8,) * (ndim - 1) + (1600,))
    core = slice(720, 880)
    lo, hi = core.start - halo, core.stop + halo
    assert lo % 8 == 0 and hi % 8 == 0
    with torch.no_grad():
        whole = net(x)[..., core]
        tile = net(x[..., lo:hi])[..., halo : halo + 160]
        assert (tile - whole).abs().max() < 1e-5 * whole.abs().max()
        # A much smaller halo does not reproduce it: the check can fail.
        small = net(x[..., core.start - 64 : core.stop + 64])[..., 64:224]
        assert (small - whole).abs().max() > 1e-4 * whole.abs().max()


def _with_batch_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return net


@pytest.mark.parametrize("ndim, shape", [(2, (2, 1, 48, 40)), (3, (1, 1, 16, 24, 16))])
def test_fold_batchnorm_equals_eval_network_and_leaves_it_alone(ndim, shape):
    torch.manual_seed(ndim)
    net = _with_batch_statistics(BranchedERFNet(ndim))
    with torch.no_grad():  # non-zero output weights, so that every output channel depends on the input
        net.decoders[0].output_conv.weight.normal_(0, 0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fold_batchnorm(net)
    assert net.training and not fused.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in fused.modules())
    x = torch.randn(*shape)
    net.eval()
    with torch.no_grad():
        expected = net(x)
        got = fused(x)
    assert expected.abs().max() > 0.1
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # Not the identity: the folded weights differ from the originals.
    assert not torch.equal(fused.decoders[1].layers[0].conv.weight, net.decoders[1].layers[0].conv.weight)


@pytest.mark.parametrize("ndim, shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))])
def test_inplace_relu_gives_the_same_outputs_and_gradients(ndim, shape, monkeypatch):
    import copy

    import embseg.net as net_module

    torch.manual_seed(ndim)
    net = _with_batch_statistics(BranchedERFNet(ndim)).train()
    reference = copy.deepcopy(net)
    x = torch.randn(*shape)

    def run(module):
        torch.manual_seed(7)  # the same dropout masks
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach()

    got = run(net)
    with monkeypatch.context() as m:
        m.setattr(net_module, "_relu", torch.relu)
        m.setattr(net_module, "_add_relu", lambda out, y: torch.relu(out + y))
        expected = run(reference)
    assert torch.equal(got, expected)
    for (name, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
    with torch.inference_mode():
        assert torch.equal(net.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("dilation", [1, 4])
def test_axis_conv3d_channels_last_runs_as_2d_and_equals_3d(axis, dilation, monkeypatch):
    import embseg.net
    from embseg.net import AxisConv3d

    # the 2D view (where oneDNN is not called directly: traced, other devices)
    monkeypatch.setattr(embseg.net, "onednn_applies", lambda x, conv: False)

    torch.manual_seed(axis)
    kernel = tuple(3 if a == axis else 1 for a in range(3))
    padding = tuple(dilation if a == axis else 0 for a in range(3))
    dilations = tuple(dilation if a == axis else 1 for a in range(3))
    conv = AxisConv3d(6, 5, kernel, padding=padding, dilation=dilations)
    plain = nn.Conv3d(6, 5, kernel, padding=padding, dilation=dilations)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 7, 9, 10, requires_grad=True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    expected = plain(x)
    got = conv(x_cl)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)  # other layouts: the 3D path
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()  # oneDNN called directly (CPU, float32): the same up to rounding, any layout
    for inp in (x, x_cl):
        torch.testing.assert_close(conv(inp), expected, rtol=1e-5, atol=1e-6)


def test_3d_network_channels_last_gives_same_output():
    torch.manual_seed(3)
    net = randomise_outputs(BranchedERFNet(3)).eval()
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last_3d)(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_folded_copy_is_cached_until_the_weights_change():
    from embseg.fold import folded_for_inference

    torch.manual_seed(0)
    net = randomise_outputs(BranchedERFNet(2))
    x = torch.randn(1, 1, 32, 32)
    first = folded_for_inference(net, "cpu")
    assert folded_for_inference(net, "cpu") is first
    assert folded_for_inference(net, "cpu", torch.channels_last) is not first  # another layout
    with torch.no_grad():
        before = first(x)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    net.train()
    net(torch.randn(2, 1, 32, 32)).square().mean().backward()  # also updates the BN statistics
    optimizer.step()
    second = folded_for_inference(net, "cpu")
    assert second is not first
    net.eval()
    with torch.no_grad():
        after = second(x)
        torch.testing.assert_close(after, net(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before)
    other = randomise_outputs(BranchedERFNet(2))
    net.load_state_dict(other.state_dict())
    assert folded_for_inference(net, "cpu") is not second


def test_network_made_in_inference_mode_is_folded_every_call():
    from embseg.fold import folded_for_inference
    from embseg.predict import predict_raw

    torch.manual_seed(0)
    with torch.inference_mode():
        net = randomise_outputs(BranchedERFNet(2))
    first = folded_for_inference(net, "cpu")
    assert folded_for_inference(net, "cpu") is not first
    image = torch.randn(1, 24, 32).numpy()
    raw = predict_raw(net, image, 2)
    with torch.inference_mode():
        expected = net.eval()(torch.from_numpy(image)[None])[0]
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def _block_outputs(net: nn.Module, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """Class names and outputs of the blocks (downsamplers, residual blocks, upsamplers) and
    of any (transposed) 3D convolution called as a module that ``net`` runs on ``x``, and its output."""
    names, outputs = [], []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        names.append(type(module).__name__)
        outputs.append(out)

    kinds = (nn.Conv3d, nn.ConvTranspose3d, NonBottleneck1d, Downsampler, Upsampler)
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return names, outputs, out


def test_inference_copy_runs_3d_convolutions_by_onednn_and_keeps_channels_last():
    """A thin 3D volume, batch of one: torch's size rule would take its slow kernels for the
    coarse layers (and lose the channels-last layout there); the inference copy calls oneDNN,
    with the ReLUs and residual adds as post-ops, gives the eval network's outputs, and every
    block runs channels-last (the output is one contiguous map)."""
    from embseg.fold import _pointwise_ops, _transpose_op, folded_for_inference

    torch.manual_seed(3)
    net = _with_batch_statistics(BranchedERFNet(3))
    with torch.no_grad():
        net.decoders[0].output_conv.weight.normal_(0, 0.1)
    net.eval()
    x = torch.randn(1, 1, 16, 48, 40)
    with torch.no_grad():
        expected = net(x)
    cl = torch.channels_last_3d
    fused = folded_for_inference(net, "cpu", cl)
    names, outputs, out = _block_outputs(fused, x.contiguous(memory_format=cl))
    assert {"_FusedDownsampler", "_FusedNonBottleneck1d", "_FusedUpsampler"} <= set(names), set(names)
    assert len(outputs) == 3 + 13 + 2 * (2 + 4)  # every block, no convolution called as a module
    assert all(t.is_contiguous(memory_format=cl) and not t.is_contiguous() for t in outputs)
    assert out.is_contiguous() and type(fused).__name__ == "_DirectOutputERFNet"
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 0.1
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        fused(x.contiguous(memory_format=cl))
    ops = {e.key for e in prof.key_averages()}
    assert not any(op.startswith("aten::slow_conv") for op in ops), sorted(ops)
    assert {"mkldnn::_convolution_pointwise", "mkldnn::_convolution_transpose_pointwise"} <= ops, sorted(ops)
    relus = sum(e.count for e in prof.key_averages() if e.key in ("aten::relu_", "aten::relu"))
    assert relus == 3  # only on the downsamplers' max-pool channels; the others are post-ops
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        fold_batchnorm(net).to(memory_format=cl)(x.contiguous(memory_format=cl))  # torch's own choice
    assert any(e.key.startswith("aten::slow_conv") for e in prof.key_averages())  # what it avoids
    # contiguous layout: the same outputs
    plain = folded_for_inference(net, "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)
    if torch.__version__.startswith("2.13"):  # the build the project pins has the operators
        assert _transpose_op() is not None and _pointwise_ops() is not None
    # Under CPU autocast the copy takes torch's own path too (the direct calls would bypass it).
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(torch.randn(1, 1, 8, 16, 16).contiguous(memory_format=cl)).dtype == torch.bfloat16
    # The original network is untouched, and with autograd on the copy takes torch's own path.
    assert not any(type(m).__name__.startswith(("_OneDNN", "_Fused", "_Direct")) for m in net.modules())
    y = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    fused(y.contiguous(memory_format=cl)).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_transposed_stride2_into_equals_the_transposed_convolution(ndim):
    """The decoders' final transposed convolution (kernel 2, stride 2) as one matrix product
    written into a channel slice of a contiguous map equals torch's, for channels-last and
    contiguous inputs and a batch of two; the rest of the map is untouched."""
    from embseg.fold import transposed_stride2_into

    torch.manual_seed(ndim)
    conv = (nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d)(16, 3, 2, stride=2)
    spatial = (5, 6, 7)[-ndim:]
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    for layout in (fmt, torch.contiguous_format):
        x = torch.randn(2, 16, *spatial).contiguous(memory_format=layout)
        out = torch.full((2, 5, *(2 * s for s in spatial)), 7.0)
        with torch.no_grad():
            transposed_stride2_into(conv, x, out[:, 1:4])
            want = conv(x)
        torch.testing.assert_close(out[:, 1:4], want, rtol=1e-5, atol=1e-6)
        assert (out[:, 0] == 7).all() and (out[:, 4] == 7).all()


def test_3d_training_of_one_crop_calls_onednn_with_the_same_gradients(monkeypatch):
    """Batch of one (common for large 3D crops): the 3D convolutions, forward and backward, run
    oneDNN's kernels rather than torch's slow reference ones, and give torch's gradients."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    import embseg.net

    torch.manual_seed(5)
    net = _with_batch_statistics(BranchedERFNet(3))
    with torch.no_grad():
        net.decoders[0].output_conv.weight.normal_(0, 0.1)
    x = torch.randn(1, 1, 16, 32, 24)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net.train()(x).square().mean().backward()
    ops = {e.key for e in prof.key_averages()}
    assert not any(op.startswith(("aten::slow_conv3d", "aten::slow_conv_dilated3d")) for op in ops), sorted(ops)
    # Gradients against torch's own kernels, in eval mode (batch-norm running statistics: well
    # conditioned; with batch statistics at random init both are ≈1 % from float64).
    plain = copy.deepcopy(net).eval()
    net.eval()
    grads = []
    for model, rule in ((net, embseg.net.onednn_applies), (plain, lambda x, conv: False)):
        monkeypatch.setattr(embseg.net, "onednn_applies", rule)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    monkeypatch.undo()
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    assert [a is None for a in grads[0][1]] == [b is None for b in grads[1][1]]
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()) + 1e-8)


@pytest.mark.skipif(not __import__("embseg.net").net.native_bf16(), reason="no native bfloat16 on this CPU")
def test_3d_convolutions_under_bf16_autocast_call_onednn_like_autocast(monkeypatch):
    """Under CPU bfloat16 autocast (``cpu_amp`` training, ``--amp`` prediction) the 3D
    convolutions call oneDNN directly in bfloat16, as autocast casts: bfloat16 outputs, float32
    weight gradients, close to torch's autocast path (which sends small batches' coarse layers
    to slower kernels)."""
    from torch.profiler import ProfilerActivity, profile

    import embseg.net

    torch.manual_seed(3)
    # channels-last, as training on the CPU runs (in the contiguous layout this torch's bfloat16
    # backward of the 128-channel axis convolutions gives non-finite weight gradients on both paths)
    fmt = torch.channels_last_3d
    net = BranchedERFNet(3).train().to(memory_format=fmt)
    x = torch.randn(1, 1, 16, 32, 24).contiguous(memory_format=fmt)
    runs = []
    for rule in (embseg.net.onednn_autocast_dtype, lambda x, conv: None):
        monkeypatch.setattr(embseg.net, "onednn_autocast_dtype", rule)
        net.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
            out.float().square().mean().backward()
        ops = {e.key for e in prof.key_averages()}
        runs.append((out.detach().float(), [p.grad for p in net.parameters()], ops, out.dtype))
    monkeypatch.undo()
    (direct, grads, ops, dtype), (plain, plain_grads, _, plain_dtype) = runs
    assert "aten::mkldnn_convolution" in ops
    assert not any(op.startswith(("aten::slow_conv3d", "aten::slow_conv_dilated3d")) for op in ops), sorted(ops)
    assert dtype == plain_dtype
    scale = float(plain.abs().max())
    assert float((direct - plain).abs().max()) <= 0.05 * scale  # bfloat16: 8 bits of mantissa
    for a, b in zip(grads, plain_grads, strict=True):
        if b is not None:
            assert a.dtype == torch.float32
            assert float((a - b).norm()) <= 0.1 * float(b.norm()) + 1e-8
    conv = embseg.net.AxisConv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embseg.net.onednn_autocast_dtype(torch.zeros(1, 8, 4, 5, 5), conv) == torch.bfloat16
        assert embseg.net.onednn_autocast_dtype(torch.zeros(1, 8, 2, 5, 5), conv) is None  # oneDNN's bug
    assert embseg.net.onednn_autocast_dtype(torch.zeros(1, 8, 4, 5, 5), conv) is None  # no autocast


@pytest.mark.parametrize(
    "shape", [(1, 1, 32, 24), (2, 1, 8, 16, 24), (2, 5, 16, 8), (1, 3, 8, 8, 16), (1, 2, 9, 7), (1, 1, 5, 7, 9)]
)
def test_pairwise_max_pool_equals_torch_max_pool_with_ties_and_nan(shape):
    """The same values as torch's max-pool, bit for bit: ties (integer images), NaN, odd sizes
    (floored), one channel and contiguous many-channel inputs, where the pool modules take it."""
    from embseg.net import MaxPool2d, MaxPool3d, pairwise_max_pool

    g = torch.Generator().manual_seed(len(shape) + shape[1])
    x = torch.randint(0, 3, shape, generator=g).float()  # many ties
    x.view(-1)[:: 11] = float("nan")
    x.view(-1)[1 :: 13] = -0.0
    ndim = len(shape) - 2
    expected = (nn.functional.max_pool2d if ndim == 2 else nn.functional.max_pool3d)(x, 2, 2)
    got = pairwise_max_pool(x)
    assert got.shape == expected.shape
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
    pool = (MaxPool2d if ndim == 2 else MaxPool3d)(2, stride=2)
    assert pool._pairwise(x) and torch.equal(torch.nan_to_num(pool(x)), torch.nan_to_num(expected))


def test_pool_keeps_torch_max_pool_where_a_gradient_flows_or_it_is_traced():
    """Autograd's maximum would split the gradient of ties; max-pool gives it to one element.
    Where a gradient flows through the pool, or it is traced or exported, torch's own operator
    runs (the network's gradients and its exports do not change)."""
    from embseg.net import MaxPool2d

    pool = MaxPool2d(2, stride=2)
    x = torch.ones(1, 1, 4, 4, requires_grad=True)
    assert not pool._pairwise(x)
    pool(x).sum().backward()
    assert sorted(x.grad.flatten().tolist()) == [0.0] * 12 + [1.0] * 4  # one element of each window
    with torch.no_grad():
        assert pool._pairwise(x)
    traced = torch.jit.trace(pool, torch.zeros(1, 1, 4, 4))
    assert "max_pool2d" in str(traced.graph)
    # channels-last many-channel input: torch's kernel is as fast there
    assert not pool._pairwise(torch.zeros(1, 4, 4, 4).contiguous(memory_format=torch.channels_last))
    assert isinstance(BranchedERFNet(2).encoder.layers[0].pool, MaxPool2d)
