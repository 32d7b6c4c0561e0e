"""The shared geometry of spatial embeddings, used by the loss and by the clustering.

Conventions (N-D, ``D`` = 2 or 3 spatial axes, arrays ordered ``(Z,)Y,X``):

* Raw network output per image: ``(2 * D + 1, *spatial)``. Channels ``0:D`` are offsets along
  the array axes in array order (``(z,) y, x``), channels ``D:2D`` are the raw bandwidths
  ``sigma`` per axis in the same order, channel ``2D`` is the seed logit.
* A pixel at index ``p`` (per axis) of an array whose first pixel sits at global index
  ``origin`` has coordinate ``x = (origin + p) * step`` where ``step`` is the grid step per axis
  (``1/1023`` in Y and X by default, ``anisotropy`` times that in Z).
* Embedding ``e = x + tanh(offset)``; bandwidth ``s = exp(10 * sigma)``; seediness
  ``sigmoid(seed_logit)``; likelihood of belonging to an object of centre ``C`` and bandwidth
  ``s``: ``phi = exp(-sum_d s_d (e_d - C_d) ** 2)``, membership iff ``phi > 0.5``.

The coordinate grid is never materialised at full size: it is computed from index arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Default grid step in Y and X (the original's 1024-point grid over one unit).
DEFAULT_STEP = 1.0 / 1023.0
#: Scale applied to raw sigma before the exponential: ``s = exp(SIGMA_SCALE * sigma)``.
SIGMA_SCALE = 10.0
#: Membership threshold on the likelihood.
PHI_THRESHOLD = 0.5


def n_output_channels(ndim: int) -> int:
    """Number of network output channels for ``ndim`` spatial axes (5 in 2D, 7 in 3D)."""
    return 2 * ndim + 1


def grid_step(ndim: int, anisotropy: float = 1.0, step: float = DEFAULT_STEP) -> tuple[float, ...]:
    """Grid step per array axis.

    Parameters
    ----------
    ndim
        Number of spatial axes (2 or 3).
    anisotropy
        Ratio ``voxel_z / voxel_xy`` (3D only; ignored in 2D).
    step
        Step in Y and X.

    Returns
    -------
    tuple of float
        ``(step_y, step_x)`` in 2D, ``(anisotropy * step, step, step)`` in 3D.
    """
    if ndim == 2:
        return (step, step)
    if ndim == 3:
        return (anisotropy * step, step, step)
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def coordinate_axes(
    shape: Sequence[int],
    step: Sequence[float],
    origin: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Per-axis coordinates, each shaped to broadcast against ``shape``.

    Axis ``d`` gets a tensor of shape ``(1, ..., n_d, ..., 1)`` holding ``(origin_d + p) * step_d``.
    """
    ndim = len(shape)
    origin = [0] * ndim if origin is None else list(origin)
    axes = []
    for d, (n, h, o) in enumerate(zip(shape, step, origin, strict=True)):
        view = [1] * ndim
        view[d] = n
        axes.append(((torch.arange(n, device=device, dtype=torch.float64) + o) * h).to(dtype).view(view))
    return axes


def coordinates(
    shape: Sequence[int],
    step: Sequence[float],
    origin: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Materialised coordinate grid ``(D, *shape)``; meant for crops and tiles, not whole volumes."""
    axes = coordinate_axes(shape, step, origin, device, dtype)
    return torch.stack([a.expand(*shape) for a in axes])


def flat_coordinates(
    flat_index: torch.Tensor,
    shape: Sequence[int],
    step: Sequence[float],
    origin: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates ``(D, N)`` of pixels given by flat (C-order) indices into ``shape``."""
    ndim = len(shape)
    origin = [0] * ndim if origin is None else list(origin)
    out = []
    rest = flat_index
    for d in range(ndim - 1, -1, -1):
        idx = rest % shape[d]
        rest = rest // shape[d]
        out.append((idx.to(torch.float64) + origin[d]) * step[d])
    return torch.stack(out[::-1]).to(dtype)


def split_raw(raw: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split raw outputs ``(..., 2D+1, *spatial)`` into offsets, raw sigmas and seed logits.

    The channel axis is ``-(ndim + 1)``. Returns views: offsets ``(..., D, *S)``,
    sigmas ``(..., D, *S)`` and seed logits ``(..., *S)``. They come from one ``torch.split``,
    whose backward writes the gradient of ``raw`` once (a concatenation, zeros for the parts
    without gradient) instead of one zero-filled full-size tensor per part, added up.
    """
    c = -(ndim + 1)
    if raw.shape[c] != n_output_channels(ndim):
        raise ValueError(f"expected {n_output_channels(ndim)} channels on axis {c}, got {raw.shape[c]}")
    offsets, sigmas, seed = torch.split(raw, [ndim, ndim, 1], dim=c)
    return offsets, sigmas, seed.squeeze(c)


def embeddings(
    offsets: torch.Tensor,
    step: Sequence[float],
    origin: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pixel embeddings ``coordinate + tanh(offset)`` for offsets ``(..., D, *S)``."""
    ndim = len(step)
    shape = offsets.shape[-ndim:]
    axes = coordinate_axes(shape, step, origin, device=offsets.device, dtype=offsets.dtype)
    grid = torch.stack([a.expand(*shape) for a in axes])
    return torch.tanh(offsets) + grid


def bandwidth(sigma: torch.Tensor) -> torch.Tensor:
    """Bandwidth ``s = exp(10 * sigma)`` from raw sigma."""
    return torch.exp(SIGMA_SCALE * sigma)


def likelihood(emb: torch.Tensor, center: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gaussian likelihood ``exp(-sum_d s_d (e_d - C_d)^2)`` over the leading vector axis.

    ``emb`` is ``(D, ...)``; ``center`` and ``s`` are ``(D,)`` or broadcastable to ``emb``.
    """
    ndim = emb.shape[0]
    view = (ndim,) + (1,) * (emb.dim() - 1)
    if center.dim() == 1:
        center = center.view(view)
    if s.dim() == 1:
        s = s.view(view)
    return torch.exp(-(s * (emb - center) ** 2).sum(0))


def membership_radius(s: torch.Tensor | float) -> torch.Tensor | float:
    """Semi-axis ``sqrt(ln 2 / s)`` (embedding units) of the ``phi = 0.5`` ellipse."""
    if isinstance(s, torch.Tensor):
        return torch.sqrt(math.log(2.0) / s)
    return math.sqrt(math.log(2.0) / s)
