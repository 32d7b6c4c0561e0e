import math

import numpy as np
import pytest
import torch

from embseg import embedding as E


def test_grid_step_2d_3d():
    assert E.grid_step(2) == (1 / 1023, 1 / 1023)
    z, y, x = E.grid_step(3, anisotropy=2.5)
    assert z == pytest.approx(2.5 / 1023) and y == x == pytest.approx(1 / 1023)
    with pytest.raises(ValueError):
        E.grid_step(4)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_coordinates_match_index_times_step(shape):
    step = tuple(0.1 * (d + 1) for d in range(len(shape)))
    origin = tuple(range(2, 2 + len(shape)))
    grid = E.coordinates(shape, step, origin)
    idx = np.indices(shape)
    for d in range(len(shape)):
        np.testing.assert_allclose(grid[d].numpy(), (idx[d] + origin[d]) * step[d], rtol=1e-6)
    flat = torch.arange(int(np.prod(shape)))
    fc = E.flat_coordinates(flat, shape, step, origin)
    np.testing.assert_allclose(fc.numpy(), grid.reshape(len(shape), -1).numpy(), rtol=1e-6)


def test_split_raw_and_channel_count():
    raw = torch.randn(2, 7, 4, 5, 6)
    off, sig, seed = E.split_raw(raw, 3)
    assert off.shape == (2, 3, 4, 5, 6) and sig.shape == (2, 3, 4, 5, 6) and seed.shape == (2, 4, 5, 6)
    assert torch.equal(seed, raw[:, 6])
    assert E.n_output_channels(2) == 5
    with pytest.raises(ValueError):
        E.split_raw(torch.randn(5, 4, 4, 4), 3)


def test_likelihood_half_level_is_membership_radius():
    s = torch.tensor([400.0, 900.0])
    center = torch.tensor([0.2, 0.3])
    r = E.membership_radius(s)
    for d in range(2):
        e = center.clone()
        e[d] += r[d]
        phi = E.likelihood(e.view(2, 1), center, s)
        assert phi.item() == pytest.approx(0.5, rel=1e-5)
    assert E.membership_radius(math.log(2)) == pytest.approx(1.0)


def test_embeddings_zero_offset_is_coordinate():
    off = torch.zeros(2, 3, 4)
    emb = E.embeddings(off, (0.5, 0.25), origin=(1, 2))
    np.testing.assert_allclose(emb.numpy(), E.coordinates((3, 4), (0.5, 0.25), (1, 2)).numpy())
    assert E.bandwidth(torch.tensor(1.0)).item() == pytest.approx(math.exp(10))
