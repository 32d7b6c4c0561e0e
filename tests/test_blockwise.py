"""Block-wise in-memory labels (embseg.blockwise): the global clustering's objects, bounded memory."""

import numpy as np
import pytest
import torch

from embseg.blockwise import paste_objects, predict_labels_blockwise
from embseg.cluster import cluster, seed_map
from embseg.predict import predict_raw
from test_predict import PointwiseNet, blob_raw

torch.set_num_threads(1)


def _by_rank(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in increasing order of their value (0 stays 0)."""
    values, inverse = np.unique(labels, return_inverse=True)
    return (inverse.reshape(labels.shape) + (values[0] != 0)).astype(np.uint32)


@pytest.mark.parametrize("shape, block", [((72, 88), (24, 32)), ((20, 40, 36), (8, 16, 16))])
def test_blockwise_labels_equal_global_clustering(shape, block):
    raw, step = blob_raw(shape, 25, seed=len(shape))
    ndim = len(shape)
    net = PointwiseNet()
    expected = cluster(predict_raw(net, raw, ndim), step, min_size=5)
    labels, seeds = predict_labels_blockwise(net, raw, ndim, step, min_size=5, block_shape=block,
                                             object_halo=8, return_seeds=True)
    assert labels.dtype == np.uint32 and labels.shape == shape
    assert expected.max() >= 10  # objects, several across block borders
    # same objects, ids in the same (seed) order, closed up to 1..N
    np.testing.assert_array_equal(labels, _by_rank(expected))
    np.testing.assert_allclose(seeds, seed_map(torch.from_numpy(raw)), rtol=0, atol=1e-6)
    none = predict_labels_blockwise(net, raw, ndim, step, seed_thresh=0.9999, block_shape=block, object_halo=8)
    assert none.max() == 0 and none.shape == shape


def test_objects_beyond_the_halo_are_reported():
    shape = (64, 64)
    raw, step = blob_raw(shape, 0, seed=0)
    h = step[0]
    grid = np.indices(shape).astype(float)
    ball = ((grid - 32.0) ** 2).sum(0) <= 20 ** 2  # radius 20 > halo 8
    for d in range(2):
        raw[d][ball] = np.arctanh((32 - grid[d][ball]) * h)
        raw[2 + d][ball] = np.log(np.log(2.0) / (1.5 * h) ** 2) / 10.0
    raw[4][ball] = 3.0
    raw[4, 32, 32] = 6.0
    with pytest.warns(UserWarning, match="halo"):
        labels = predict_labels_blockwise(PointwiseNet(), raw, 2, step, min_size=5, block_shape=16, object_halo=8)
    assert 0 < (labels == 1).sum() < ball.sum()  # cut to the cluster region of its block


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_overlaps_go_to_the_later_object_whatever_the_paste_order(order):
    labels = np.zeros((6, 6), np.uint32)
    value = np.array([0.0, 0.95, 0.91])  # object 2 is later in the seed order (lower seediness)
    flat = np.array([0, 7, 28])
    a = np.zeros((4, 4), np.uint32)
    a[:3, :3] = 1
    pieces = [(a, (0, 0), np.array([1])), (a.copy(), (2, 2), np.array([2]))]
    for i in order:
        paste_objects(labels, *pieces[i], value, flat)
    assert labels[2, 2] == 2  # the pixel both claim
    assert (labels == 1).sum() == 8 and (labels == 2).sum() == 9


def test_model_predict_blocks_and_global_routes_agree():
    from embseg.config import ModelConfig
    from embseg.errors import UserError
    from embseg.model import Model
    from embseg.normalize import percentile_stats

    raw, step = blob_raw((16, 48, 40), 20, seed=7)
    lo, hi = percentile_stats(raw, 0.0, 100.0)
    lo = torch.tensor(lo, dtype=torch.float32).view(1, -1, 1, 1, 1)
    span = torch.tensor(hi, dtype=torch.float32).view(1, -1, 1, 1, 1) - lo

    class Denormalise(torch.nn.Module):  # undoes the model's normalisation: outputs = raw
        def forward(self, x):
            return x * span + lo

    config = ModelConfig(ndim=3, in_channels=7, grid_step=list(step), min_size=5, halo=0,
                         norm_low=0.0, norm_high=100.0, crop_size=[16, 16, 16])
    model = Model(config, Denormalise())
    blocks = model.predict(raw, axes="CZYX", tile_shape=(8, 16, 16), device="cpu")
    exact = model.predict(raw, axes="CZYX", tile_shape=(8, 16, 16), device="cpu", clustering="global")
    assert blocks.max() >= 10
    np.testing.assert_array_equal(blocks, exact)
    with pytest.raises(UserError, match="clustering"):
        model.predict(raw, axes="CZYX", clustering="nearest")
