"""Percentile normalisation: per-channel statistics, no clipping, constant and NaN inputs."""

from __future__ import annotations

import numpy as np
import pytest

from embseg.errors import UserError
from embseg.normalize import (
    _subsample,
    apply_normalization,
    percentile_normalize,
    percentile_stats,
)


def test_stats_match_numpy_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(0, 1, (40, 50)), rng.uniform(100, 200, (40, 50))])
    lo, hi = percentile_stats(image, 1.0, 99.8)
    assert lo.shape == hi.shape == (2,)
    for c in range(2):
        assert lo[c] == pytest.approx(np.percentile(image[c], 1.0))
        assert hi[c] == pytest.approx(np.percentile(image[c], 99.8))


def test_normalized_channels_hit_zero_and_one_without_clipping():
    rng = np.random.default_rng(1)
    image = np.stack([rng.normal(10, 3, (64, 64)), rng.normal(-500, 50, (64, 64))])
    out = percentile_normalize(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    for c in range(2):
        assert np.percentile(out[c], 1.0) == pytest.approx(0.0, abs=1e-5)
        assert np.percentile(out[c], 99.8) == pytest.approx(1.0, abs=1e-5)
        # no clipping: the tails stay outside [0, 1]
        assert out[c].min() < 0.0 and out[c].max() > 1.0


def test_formula_on_a_ramp():
    image = np.arange(101, dtype=np.uint8)[None]
    out = percentile_normalize(image, low=0, high=100)
    np.testing.assert_allclose(out[0], np.arange(101) / 100.0, rtol=1e-6)
    out = apply_normalization(image, np.array([10.0]), np.array([60.0]))
    np.testing.assert_allclose(out[0], (np.arange(101) - 10) / 50.0, rtol=1e-6)


def test_constant_image_gives_zeros():
    image = np.full((2, 8, 8), 7, dtype=np.uint16)
    out = percentile_normalize(image)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)
    # one constant channel next to a normal one
    image = np.stack([np.full((8, 8), 3.0), np.arange(64.0).reshape(8, 8)])
    out = percentile_normalize(image, 0, 100)
    assert np.all(out[0] == 0.0)
    assert out[1].max() == pytest.approx(1.0)


def test_nans_are_ignored_by_stats_and_passed_through():
    image = np.arange(100.0).reshape(1, 10, 10)
    with_nan = image.copy()
    with_nan[0, 0, :5] = np.nan
    lo, hi = percentile_stats(with_nan, 0, 100)
    assert lo[0] == 5.0 and hi[0] == 99.0
    out = percentile_normalize(with_nan, 0, 100)
    assert np.isnan(out[0, 0, :5]).all()
    assert np.isfinite(out[0, 0, 5:]).all() and np.isfinite(out[0, 1:]).all()
    all_nan = np.full((1, 4, 4), np.nan)
    lo, hi = percentile_stats(all_nan)
    assert np.isnan(lo[0]) and np.isnan(hi[0])


def test_channel_axis_none_gives_scalars():
    image = np.arange(1000.0).reshape(10, 100)
    lo, hi = percentile_stats(image, 1, 99, channel_axis=None)
    assert lo.shape == () and hi.shape == ()
    assert float(lo) == pytest.approx(np.percentile(image, 1))
    out = percentile_normalize(image, 1, 99, channel_axis=None)
    assert out.shape == image.shape
    assert np.percentile(out, 99) == pytest.approx(1.0, abs=1e-5)


def test_channel_axis_last():
    rng = np.random.default_rng(2)
    image = np.stack([rng.uniform(0, 1, (20, 20)), rng.uniform(0, 10, (20, 20))], axis=-1)
    out = percentile_normalize(image, 0, 100, channel_axis=-1)
    np.testing.assert_allclose(out.max(axis=(0, 1)), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.min(axis=(0, 1)), [0.0, 0.0], atol=1e-6)


def test_subsample_respects_budget_and_is_close_to_full_stats():
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 50.0, (1, 600, 700)).astype(np.float32)
    sample = _subsample(image[0], 20_000)
    assert 0 < sample.size <= 20_000
    lo_full, hi_full = percentile_stats(image, max_samples=None)
    lo, hi = percentile_stats(image, max_samples=20_000)
    spread = hi_full[0] - lo_full[0]
    assert abs(lo[0] - lo_full[0]) < 0.02 * spread
    assert abs(hi[0] - hi_full[0]) < 0.05 * spread
    # 3D subsample strides every axis
    volume = np.zeros((30, 40, 50))
    assert _subsample(volume, 1000).size <= 1000


def test_bad_arguments_raise_user_error():
    image = np.zeros((1, 4, 4))
    with pytest.raises(UserError):
        percentile_stats(image, 50, 10)
    with pytest.raises(UserError):
        percentile_stats(image, -1, 10)
    with pytest.raises(UserError):
        percentile_stats(np.zeros((1, 0)))
    with pytest.raises(UserError):
        apply_normalization(image, np.zeros(2), np.ones(2))
    with pytest.raises(UserError):
        apply_normalization(image, np.zeros(1), np.ones(2))


def test_real_dsb_image(data_dir):
    tifffile = pytest.importorskip("tifffile")
    files = sorted((data_dir / "dsb2018_fluo" / "train" / "images").glob("*.tif"))
    if not files:
        pytest.skip("no DSB images")
    image = tifffile.imread(files[0])[None]
    out = percentile_normalize(image)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.percentile(out, 1.0) == pytest.approx(0.0, abs=1e-4)
    assert np.percentile(out, 99.8) == pytest.approx(1.0, abs=1e-3)
