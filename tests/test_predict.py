"""Prediction: tiled equals whole-image, TTA sign/permutation rules, end to end to labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from embseg.embedding import grid_step, n_output_channels
from embseg.predict import (
    NETWORK_STRIDE,
    TTATransform,
    default_batch_size,
    default_channels_last,
    predict_labels,
    predict_labels_streamed,
    predict_raw,
    tta_transforms,
)
from embseg.tiling import pad_to_multiple

torch.set_num_threads(1)

H = 1.0 / 1023.0


class StandInNet(nn.Module):
    """A tiny N-D network with a stride-2 stage (so tile alignment matters); receptive
    field radius at most 6 pixels."""

    def __init__(self, ndim: int, in_channels: int = 1):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        pool = nn.AvgPool2d if ndim == 2 else nn.AvgPool3d
        self.a = conv(in_channels, 4, 3, padding=1)
        self.pool = pool(2)
        self.b = conv(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c = conv(8, n_output_channels(ndim), 3, padding=1)
        self.dropout = nn.Dropout(0.5)  # eval mode must switch it off

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = self.up(torch.relu(self.b(self.pool(h))))
        return self.c(self.dropout(torch.cat([h, g], 1)))


def stand_in(ndim, in_channels=1):
    torch.manual_seed(0)
    return StandInNet(ndim, in_channels)


class EquivariantNet(nn.Module):
    """Exactly equivariant outputs: offsets = central differences (a vector field), sigmas =
    per-axis |gradient| + curvature (permute with the axes), seed = a pixel-wise function."""

    def __init__(self, ndim: int):
        super().__init__()
        self.ndim = ndim

    def forward(self, x):
        image = x[:, 0] + 0.5 * x[:, -1] ** 2
        grads, sigmas = [], []
        for d in range(self.ndim):
            dim = 1 + d
            n = image.shape[dim]
            padded = torch.cat([image.narrow(dim, 0, 1), image, image.narrow(dim, n - 1, 1)], dim)
            forward, backward = padded.narrow(dim, 2, n), padded.narrow(dim, 0, n)
            grads.append((forward - backward) / 2)
            sigmas.append(torch.abs(forward - backward) + (forward + backward - 2 * image))
        return torch.stack([*grads, *sigmas, image], 1)


def random_image(shape, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(channels, *shape)).astype(np.float32)


def reflect_forward(net, image, halo):
    """Whole-image reference: reflect-pad by the halo, pad to 8, forward, crop."""
    ndim = image.ndim - 1
    padded = np.pad(image, [(0, 0)] + [(halo, halo)] * ndim, mode="reflect")
    padded, _ = pad_to_multiple(padded, NETWORK_STRIDE, ndim=ndim)
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(padded)[None])[0]
    return out[(slice(None), *[slice(halo, halo + n) for n in image.shape[1:]])]


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    ("shape", "channels", "tile_shape", "halo"),
    [
        ((37, 45), 1, 16, 8),
        ((40, 24), 2, (8, 16), (7, 9)),
        ((13, 21, 19), 1, (8, 8, 16), 8),
        ((9, 16, 17), 2, 8, (6, 7, 8)),
    ],
)
def test_tiled_equals_whole(shape, channels, tile_shape, halo):
    ndim = len(shape)
    net = stand_in(ndim, channels)
    image = random_image(shape, channels)
    whole = predict_raw(net, image, ndim, halo=halo)
    tiled = predict_raw(net, image, ndim, tile_shape=tile_shape, halo=halo, batch_size=3)
    assert tiled.shape == whole.shape == (n_output_channels(ndim), *shape)
    assert tiled.dtype == torch.float32
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)
    if isinstance(halo, int):
        torch.testing.assert_close(whole, reflect_forward(net, image, halo), atol=1e-5, rtol=0)


def test_too_small_halo_is_visible():
    # The same comparison fails without enough context: the test above can fail.
    net = stand_in(2)
    image = random_image((37, 45))
    whole = predict_raw(net, image, 2, halo=8)
    tiled = predict_raw(net, image, 2, tile_shape=16, halo=1)
    assert (tiled - whole).abs().max() > 1e-3


def test_whole_image_without_halo_is_plain_forward():
    net = stand_in(2)
    image = random_image((30, 20))
    padded, crop = pad_to_multiple(image, 8, ndim=2)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(padded)[None])[0][(slice(None), *crop[1:])]
    torch.testing.assert_close(predict_raw(net, image, 2), expected, atol=1e-6, rtol=0)


def test_mode_device_and_output_tensor(monkeypatch):
    import embseg.predict

    monkeypatch.setattr(embseg.predict, "cpu_bf16_supported", lambda: False)
    net = stand_in(2)
    net.train()
    image = random_image((16, 16))
    first = predict_raw(net, image, 2, device="cpu", amp=True)  # amp is ignored without native bf16
    assert net.training
    second = predict_raw(net, image, 2)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # dropout was off
    first.add_(1.0)  # an ordinary tensor, not an inference tensor


@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_and_batching_change_nothing_but_rounding(ndim):
    net = stand_in(ndim)
    image = random_image((24, 40) if ndim == 2 else (8, 16, 24))
    plain = predict_raw(net, image, ndim, channels_last=False, batch_size=8, tta=True)
    fast = predict_raw(net, image, ndim, channels_last=True, batch_size=1, tta=True)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert fast.is_contiguous()
    # the module's parameters are handed back in the default layout
    assert all(p.is_contiguous() for p in net.parameters())
    assert default_batch_size("cpu") == 1 and default_batch_size("meta") == 8
    assert default_channels_last("cpu") and not default_channels_last("meta")


def test_bad_inputs():
    net = stand_in(2)
    with pytest.raises(ValueError, match="spatial axes"):
        predict_raw(net, random_image((4, 8, 8)), 2)
    with pytest.raises(ValueError, match="halo"):
        predict_raw(net, random_image((16, 16)), 2, tile_shape=8)
    with pytest.raises(ValueError, match="channels"):
        predict_raw(nn.Conv2d(1, 3, 1), random_image((16, 16)), 2)


# ----------------------------------------------------------------------------- TTA


@pytest.mark.parametrize("ndim", [2, 3])
def test_transforms_form_the_group(ndim):
    transforms = tta_transforms(ndim)
    assert len(transforms) == (8 if ndim == 2 else 16)
    assert transforms[0] == TTATransform(ndim)
    spatial = (5, 4, 6) if ndim == 3 else (4, 6)
    x = torch.arange(2 * math.prod(spatial), dtype=torch.float32).reshape(1, 2, *spatial)
    images = set()
    for t in transforms:
        y = t.forward(x)
        assert y.shape[2:] == t.transformed_shape(x.shape[2:])
        torch.testing.assert_close(t.inverse(y), x, atol=0, rtol=0)
        images.add(tuple(y.shape) + tuple(y.flatten().tolist()))
        a = t.vector_matrix()
        np.testing.assert_array_equal(np.abs(a).sum(0), 1)
        np.testing.assert_array_equal(a.T @ a, np.eye(ndim))
        if ndim == 3:
            assert abs(a[0, 0]) == 1  # Z never mixes with Y or X
    assert len(images) == len(transforms)


@pytest.mark.parametrize("shape", [(24, 40), (21, 35), (8, 16, 24), (11, 13, 10)])
def test_each_variant_maps_back_exactly(shape):
    ndim = len(shape)
    net = EquivariantNet(ndim)
    x = torch.from_numpy(random_image(shape, 2))[None]
    reference = net(x)
    for t in tta_transforms(ndim):
        torch.testing.assert_close(t.inverse_raw(net(t.forward(x))), reference, atol=1e-5, rtol=0)
    # A wrong sign would be caught: negate the y offset of one variant.
    t = tta_transforms(ndim)[1]
    wrong = t.inverse_raw(net(t.forward(x)))
    wrong[:, ndim - 2] *= -1
    assert (wrong - reference).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("shape", "tile_shape"),
    [((21, 35), None), ((40, 24), 16), ((10, 13, 17), None), ((16, 24, 16), 8)],
)
def test_tta_average_equals_plain_for_equivariant_net(shape, tile_shape):
    ndim = len(shape)
    net = EquivariantNet(ndim)
    image = random_image(shape, 2, seed=3)
    halo = None if tile_shape is None else 2
    plain = predict_raw(net, image, ndim, tile_shape=tile_shape, halo=halo)
    for batch_size in (3, 16):
        tta = predict_raw(
            net, image, ndim, tile_shape=tile_shape, halo=halo, tta=True, batch_size=batch_size
        )
        torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)


def test_tta_changes_a_non_equivariant_net():
    net = stand_in(2)
    image = random_image((24, 32))
    plain = predict_raw(net, image, 2)
    tta = predict_raw(net, image, 2, tta=True)
    assert (tta - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------- end to end


class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


def disc_outputs(shape, centers, radius):
    """Ideal raw outputs (as a 5-channel "image") and the labels of discs in 2D."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
    labels = np.zeros(shape, np.int64)
    target = grid.copy()
    for k, c in enumerate(centers, start=1):
        inside = ((grid - np.reshape(c, (2, 1, 1))) ** 2).sum(0) <= radius**2
        labels[inside] = k
        target[:, inside] = np.reshape(c, (2, 1))
    raw = np.zeros((5, *shape), np.float32)
    raw[:2] = np.arctanh((target - grid) * H)
    raw[2:4] = math.log(math.log(2.0) / (3 * H) ** 2) / 10
    raw[4] = np.where(labels > 0, 4.0, -4.0)
    return raw, labels


@pytest.mark.parametrize("tile_shape", [None, 24])
def test_predict_labels_end_to_end(tile_shape):
    centers = [
        (10, 10),
        (12, 40),
        (30, 23),
        (50, 52),
        (47, 8),
        (33, 44),
    ]  # several cross tile borders
    raw, truth = disc_outputs((60, 64), centers, 6)
    labels, seed = predict_labels(
        Identity(),
        raw,
        2,
        grid_step(2),
        min_size=20,
        tile_shape=tile_shape,
        halo=None if tile_shape is None else 0,
    )
    assert labels.dtype == np.uint32 and seed.dtype == np.float32
    assert labels.shape == seed.shape == truth.shape
    assert labels.max() == len(centers)
    for k in range(1, len(centers) + 1):
        ids = np.unique(labels[truth == k])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(labels == ids[0], truth == k)
    np.testing.assert_allclose(seed, 1 / (1 + np.exp(-raw[4])), rtol=1e-6)


# ----------------------------------------------------------------------------- streamed labels


class PointwiseNet(nn.Module):
    """The input is the raw output (a 1x1 'network'): tiles see exactly what the whole sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def blob_raw(shape, n_objects, seed):
    """Raw outputs of random balls: offsets to the ball centre, tight bandwidth, seed peak at
    the centre, background seediness below the foreground threshold."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    step = [H] * ndim
    raw = np.zeros((2 * ndim + 1, *shape), np.float32)
    raw[ndim : 2 * ndim] = 0.3
    raw[2 * ndim] = rng.uniform(-6, 0.5, shape)  # some background candidates too
    grid = np.indices(shape).astype(float)
    for _ in range(n_objects):
        c = np.array([rng.uniform(3, s - 3) for s in shape])
        r = rng.uniform(2.0, 4.0)
        ball = ((grid - c.reshape(-1, *[1] * ndim)) ** 2).sum(0) <= r * r
        centre = np.round(c).astype(int)
        for d in range(ndim):
            raw[d][ball] = np.arctanh((centre[d] - grid[d][ball]) * H)
            raw[ndim + d][ball] = np.log(np.log(2.0) / (1.5 * H) ** 2) / 10.0
        raw[2 * ndim][ball] = 3.0
        raw[(2 * ndim, *centre)] = 5.0 + rng.uniform(0, 1)
    return raw, step


@pytest.mark.parametrize("shape, tile", [((72, 88), (24, 32)), ((20, 40, 36), (8, 16, 16))])
def test_streamed_labels_equal_whole_raw_clustering(shape, tile):
    from embseg.cluster import cluster, seed_map

    raw, step = blob_raw(shape, 25, seed=len(shape))
    net = PointwiseNet()
    ndim = len(shape)
    whole = predict_raw(net, raw, ndim, tile_shape=tile, halo=8)
    expected = cluster(whole, step, min_size=5)
    labels, seeds = predict_labels_streamed(net, raw, ndim, step, min_size=5, tile_shape=tile, halo=8,
                                            return_seeds=True)
    assert expected.max() >= 10  # objects, several crossing tile borders
    np.testing.assert_array_equal(labels, expected)  # ids included
    # torch's SIMD sigmoid rounds a few values differently on a tile than on the whole map
    np.testing.assert_allclose(seeds, seed_map(whole), rtol=0, atol=1e-6)
    # nothing reaches the seed threshold: all background, no clustering
    none = predict_labels_streamed(net, raw, ndim, step, seed_thresh=0.9999, tile_shape=tile, halo=8)
    assert none.max() == 0 and none.shape == shape


def test_model_predict_tiled_route_equals_one_pass_clustering():
    from embseg.config import ModelConfig
    from embseg.model import Model
    from embseg.normalize import percentile_stats

    class Denormalise(nn.Module):  # undoes the model's normalisation: outputs = raw
        def __init__(self, lo, hi):
            super().__init__()
            self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32).view(1, -1, 1, 1, 1))
            self.register_buffer("span", torch.tensor(hi - lo, dtype=torch.float32).view(1, -1, 1, 1, 1))

        def forward(self, x):
            return x * self.span + self.lo

    raw, step = blob_raw((16, 48, 40), 20, seed=7)
    config = ModelConfig(ndim=3, in_channels=7, grid_step=list(step), min_size=5, halo=8,
                         norm_low=0.0, norm_high=100.0)
    model = Model(config, Denormalise(*percentile_stats(raw, 0.0, 100.0)))
    data = model.prepare(raw, axes="CZYX")
    one_pass = model.cluster(model.predict_raw(data, normalized=True, device="cpu"))
    tiled, seeds = model.predict(raw, axes="CZYX", tile_shape=(8, 16, 16), device="cpu", return_seeds=True)
    np.testing.assert_array_equal(tiled, one_pass)
    assert tiled.max() >= 10 and seeds.shape == tiled.shape


@pytest.mark.parametrize("channels_last_net", [False, True])
def test_inference_gives_back_the_very_parameter_tensors(channels_last_net):
    """A net in training (e.g. channels-last weights with fused Adam state) must come out of a
    prediction with the same parameter memory and strides it went in with."""
    net = StandInNet(2)
    if channels_last_net:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    before = [(p.data_ptr(), p.stride()) for p in net.parameters()]
    image = np.random.default_rng(0).normal(size=(1, 32, 40)).astype(np.float32)
    for channels_last in (False, True):
        predict_raw(net, image, 2, channels_last=channels_last)
        assert [(p.data_ptr(), p.stride()) for p in net.parameters()] == before
    assert net.training
