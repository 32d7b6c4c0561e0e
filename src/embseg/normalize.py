"""Percentile normalisation of images, per channel.

``x -> (x - p_low) / (p_high - p_low)`` with the percentiles (default 1 and 99.8) taken over the
whole image of each channel, and **no clipping**: values below ``p_low`` become negative and values
above ``p_high`` exceed 1, as in the original method. A constant channel (``p_high == p_low``)
normalises to zeros instead of dividing by zero.

For big arrays the percentiles are taken on a regular subsample (every ``f``-th pixel along every
spatial axis, ``f`` chosen so that at most ``max_samples`` values per channel are read); the
percentiles of a dense regular grid differ from the full-image ones by far less than the spread
of the intensities themselves, and it keeps the statistics of a multi-gigabyte volume cheap.
NaNs are ignored by the statistics and passed through by the normalisation.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from embseg.errors import UserError

#: Default lower / upper percentile.
DEFAULT_LOW = 1.0
DEFAULT_HIGH = 99.8
#: Default cap on the number of values per channel used for the percentiles.
DEFAULT_MAX_SAMPLES = 4_000_000


def _subsample(channel: np.ndarray, max_samples: int | None) -> np.ndarray:
    """Regular subsample of ``channel`` (every ``f``-th pixel per axis) with at most
    about ``max_samples`` values."""
    if max_samples is None or channel.size <= max_samples or channel.ndim == 0:
        return channel
    factor = math.ceil((channel.size / max_samples) ** (1.0 / channel.ndim))
    sample = channel[(slice(None, None, factor),) * channel.ndim]
    while sample.size > max_samples:  # rounding of the per-axis factor can overshoot slightly
        factor += 1
        sample = channel[(slice(None, None, factor),) * channel.ndim]
    return sample


def _percentiles(values: np.ndarray, q: list[float]) -> np.ndarray:
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        with warnings.catch_warnings():
            # an all-NaN channel gives NaN statistics; the caller decides what to do with them
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanpercentile(values, q).astype(np.float64)
    return np.percentile(values, q).astype(np.float64)


def percentile_stats(
    image: np.ndarray,
    low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
    channel_axis: int | None = 0,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentiles of an image, per channel.

    Parameters
    ----------
    image
        Array ``(C, *spatial)`` (with ``channel_axis=0``) or any array (``channel_axis=None``).
    low, high
        Percentiles in ``[0, 100]``, ``low < high``.
    channel_axis
        Axis holding the channels, or ``None`` for one statistic over the whole array.
    max_samples
        At most about this many values per channel are used (a regular strided subsample, see
        the module docstring); ``None`` uses every value.

    Returns
    -------
    lo, hi : numpy.ndarray
        float64 arrays of shape ``(C,)``, or 0-d arrays when ``channel_axis`` is ``None``.
        NaNs are ignored; an all-NaN channel gives NaN.

    Examples
    --------
    >>> lo, hi = percentile_stats(np.arange(101.0)[None], low=1, high=99)
    >>> float(lo[0]), float(hi[0])
    (1.0, 99.0)
    """
    if not (0.0 <= low < high <= 100.0):
        raise UserError(
            f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}"
        )
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples must be positive, got {max_samples}")
    image = np.asarray(image)
    if image.size == 0:
        raise UserError("cannot normalise an empty image")
    q = [float(low), float(high)]
    if channel_axis is None:
        p = _percentiles(_subsample(image, max_samples), q)
        return p[0].copy(), p[1].copy()
    channels = np.moveaxis(image, channel_axis, 0)
    stats = np.stack([_percentiles(_subsample(c, max_samples), q) for c in channels])
    return stats[:, 0].copy(), stats[:, 1].copy()


def apply_normalization(
    image: np.ndarray,
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    eps: float = 1e-20,
    channel_axis: int | None = 0,
) -> np.ndarray:
    """``(image - lo) / (hi - lo)`` as float32, per channel, without clipping.

    Parameters
    ----------
    image
        Array ``(C, *spatial)`` (or any array when ``lo`` and ``hi`` are scalars).
    lo, hi
        Scalars, or arrays of shape ``(C,)`` applied along ``channel_axis``.
    eps
        Where ``hi - lo <= eps`` (a constant channel) the output is 0 instead of a division by
        zero, so the result is finite wherever the input is.
    channel_axis
        Axis of ``image`` that ``lo`` and ``hi`` run along when they are 1-D.

    Returns
    -------
    numpy.ndarray
        float32 array of the shape of ``image``.
    """
    image = np.asarray(image)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape:
        raise UserError(f"lo and hi must have the same shape, got {lo.shape} and {hi.shape}")
    span = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(span > eps, 1.0 / np.where(span > eps, span, 1.0), 0.0)
    if lo.ndim == 1:
        if channel_axis is None:
            raise UserError("per-channel lo/hi need a channel_axis")
        axis = channel_axis % image.ndim
        if image.shape[axis] != lo.shape[0]:
            raise UserError(
                f"image has {image.shape[axis]} channels on axis {channel_axis}, "
                f"statistics have {lo.shape[0]}"
            )
        view = [1] * image.ndim
        view[axis] = lo.shape[0]
        lo = lo.reshape(view)
        scale = scale.reshape(view)
    elif lo.ndim > 1:
        raise UserError(
            f"lo and hi must be scalars or 1-D per-channel arrays, got shape {lo.shape}"
        )
    out = image.astype(np.float32, copy=True)
    out -= lo.astype(np.float32)
    out *= scale.astype(np.float32)
    return out


def percentile_normalize(
    image: np.ndarray,
    low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
    channel_axis: int | None = 0,
    eps: float = 1e-20,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> np.ndarray:
    """Percentile-normalise an image per channel (see :func:`percentile_stats` and
    :func:`apply_normalization`).

    Examples
    --------
    >>> x = percentile_normalize(np.array([[0.0, 50.0, 100.0]]), low=0, high=100)
    >>> x.tolist()
    [[0.0, 0.5, 1.0]]
    """
    lo, hi = percentile_stats(image, low, high, channel_axis=channel_axis, max_samples=max_samples)
    return apply_normalization(image, lo, hi, eps=eps, channel_axis=channel_axis)
