"""TorchScript greedy seed clustering, N-D, equal to :func:`embseg.cluster.cluster`.

This module is self-contained on purpose: it imports nothing but ``math`` and
``torch``, so that its source can be shipped verbatim inside a bioimage.io package (next to the
network) and compiled by :func:`torch.jit.script`. :class:`LabelPredictor` wraps a network and
this clustering into one module whose forward pass maps a normalised image to instance labels
and a seed map; the TorchScript export and the ``pytorch_state_dict`` architecture of a
bioimage.io package are that module, so both weight formats give the same outputs.

The algorithm is the one of :mod:`embseg.cluster` (DESIGN.md, "Clustering"), including its
documented choices: candidates have seediness ``> fg_thresh``; seeds (seediness
``>= seed_thresh``) are visited in one stable descending sort; a proposal is every candidate with
``phi > 0.5`` for the seed's own embedding and bandwidth; it is accepted when it has at least
``min_size`` pixels and strictly more than half of them (the seed included) are unclustered; an
accepted proposal takes the next label on all its pixels, overwriting earlier labels; the
proposal and the seed are marked clustered either way; with ``max_radius`` (pixels per axis),
a pixel whose ``phi = 0.5`` ellipse reaches farther on some axis is not a seed.

TorchScript cannot run the compiled grid search of :mod:`embseg.cluster_kernel`. The window
here: the candidates are sorted once by their embedding along one axis ``a`` (the longest array
axis). A pixel ``j`` can only be in the proposal of seed
``k`` if ``s_k,a (e_j,a - e_k,a)^2 < ln 2`` (every other term of the exponent is non-negative),
so it lies in the sorted range ``[e_k,a - r, e_k,a + r]`` with ``r = sqrt(ln 2 / s_k,a)``
(inflated by a tiny margin against rounding). The ranges of all seeds come from one
:func:`torch.searchsorted`; each visited seed tests its range exactly, as a contiguous slice.

Every float that decides a membership is computed with the same torch operations, in the same
order and on tensors of the same layout as :func:`embseg.cluster.candidate_geometry`, and the
exponent is summed axis by axis left to right as NumPy does in :func:`embseg.cluster.greedy_labels`;
so the labels are the same to the bit (the only library difference is ``exp`` itself, NumPy's
versus torch's, which could disagree in the last bit of a ``phi`` within one rounding step of 0.5).
"""

import math

import torch
from torch import nn

# TorchScript cannot read module-level floats, so the constants are literals in the code:
# membership iff phi > 0.5; bandwidth s = exp(10 * sigma); the search window is widened by a
# relative 1e-6 plus an absolute 1e-12 against rounding (it may only grow, never shrink).


def pixel_coordinates(index: torch.Tensor, shape: list[int], step: list[float]) -> torch.Tensor:
    """Coordinates ``(D, N)`` (float64) of pixels given by flat C-order indices into ``shape``."""
    out: list[torch.Tensor] = []
    rest = index
    for d in range(len(shape) - 1, -1, -1):
        idx = rest % shape[d]
        rest = rest // shape[d]
        out.append(idx.to(torch.float64) * step[d])
    out.reverse()
    return torch.stack(out)


def candidate_geometry(
    raw: torch.Tensor, step: list[float], fg_thresh: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of raw outputs ``(2D+1, *S)``: flat index ``(N,)``, embeddings ``(D, N)``,
    bandwidths ``(D, N)`` and seediness ``(N,)``, all float64 (index int64)."""
    ndim = len(step)
    shape: list[int] = list(raw.shape[1:])
    seed = torch.sigmoid(raw[2 * ndim].float()).reshape(-1).to(torch.float64)
    index = torch.nonzero(seed > fg_thresh).reshape(-1)
    offsets = raw[:ndim].reshape(ndim, -1)[:, index].to(torch.float64)
    emb = torch.tanh(offsets) + pixel_coordinates(index, shape, step)
    sigmas = raw[ndim : 2 * ndim].reshape(ndim, -1)[:, index].to(torch.float64)
    s = torch.exp(10.0 * sigmas)
    return index, emb, s, seed[index]


def window_axis(shape: list[int]) -> int:
    """The axis the candidates are sorted along: the longest one (the first of equals)."""
    best = 0
    for d in range(1, len(shape)):
        if shape[d] > shape[best]:
            best = d
    return best


def greedy_labels(
    emb: torch.Tensor,
    s: torch.Tensor,
    seed: torch.Tensor,
    axis: int,
    seed_thresh: float,
    min_size: int,
    s_min: list[float],
) -> torch.Tensor:
    """Greedy clustering of candidates (embeddings and bandwidths ``(D, N)``, seediness ``(N,)``).

    A pixel with a bandwidth below ``s_min`` (per axis; empty: no limit) is not a seed.

    Returns ``(N,)`` int64 labels, 0 = unassigned, objects numbered in acceptance order (an
    object overwritten entirely by later ones leaves a gap).
    """
    ndim = emb.shape[0]
    n = seed.shape[0]
    labels_sorted = torch.zeros(n, dtype=torch.int64, device=seed.device)
    if n == 0:
        return labels_sorted
    # Candidates in the order of their embedding along `axis`: every window is a slice.
    key, perm = torch.sort(emb[axis], stable=True)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(n, device=perm.device)
    emb_sorted = emb[:, perm].t().contiguous()
    s_sorted = s[:, perm].t().contiguous()

    order = torch.argsort(seed, descending=True, stable=True)
    n_seeds = int((seed >= seed_thresh).sum())
    seeds = order[:n_seeds]
    if len(s_min) > 0:
        limit = torch.tensor(s_min, dtype=s.dtype, device=s.device).unsqueeze(1)
        seeds = seeds[(s[:, seeds] >= limit).all(0)]
        n_seeds = seeds.shape[0]
    radius = torch.sqrt(math.log(2.0) / s[axis, seeds]) * (1.0 + 1e-6) + 1e-12
    radius = torch.where(torch.isnan(radius), torch.full_like(radius, math.inf), radius)
    centre = emb[axis, seeds]
    starts: list[int] = torch.searchsorted(key, centre - radius).tolist()
    stops: list[int] = torch.searchsorted(key, centre + radius, right=True).tolist()
    positions: list[int] = rank[seeds].tolist()

    clustered = torch.zeros(n, dtype=torch.bool, device=seed.device)
    next_label = 1
    for i in range(n_seeds):
        k = positions[i]
        if bool(clustered[k]):
            continue
        lo = starts[i]
        diff = emb_sorted[lo : stops[i]] - emb_sorted[k]
        terms = s_sorted[k] * diff * diff
        exponent = terms[:, 0]
        for d in range(1, ndim):
            exponent = exponent + terms[:, d]
        phi = torch.exp(-exponent)
        proposal = torch.nonzero(phi > 0.5).reshape(-1) + lo
        size = proposal.shape[0]
        n_free = size - int(clustered[proposal].sum())
        if size >= min_size and 2 * n_free > size:
            labels_sorted[proposal] = next_label
            next_label += 1
        clustered[proposal] = True
        # phi(seed) = 1, but a non-finite bandwidth must not let a seed be visited twice.
        clustered[k] = True
    return labels_sorted[rank]


def cluster(
    raw: torch.Tensor,
    step: list[float],
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_size: int = 10,
    max_radius: list[float] | None = None,
) -> torch.Tensor:
    """Instance labels ``(*S)`` (int64, gaps possible) of raw outputs ``(2D+1, *S)``.

    The same result as :func:`embseg.cluster.cluster` (which returns uint32) on the same
    tensor; pass it contiguous, as that function sees it. ``max_radius``: pixels per axis, as
    there (``None`` or empty: no limit).
    """
    s_min: list[float] = []
    if max_radius is not None:
        for d in range(len(max_radius)):
            s_min.append(math.log(2.0) / (max_radius[d] * step[d]) ** 2)
    shape: list[int] = list(raw.shape[1:])
    index, emb, s, seed = candidate_geometry(raw, step, fg_thresh)
    flat = torch.zeros(raw[0].numel(), dtype=torch.int64, device=raw.device)
    flat[index] = greedy_labels(emb, s, seed, window_axis(shape), seed_thresh, min_size, s_min)
    return flat.reshape(shape)


def relabel_sequential(labels: torch.Tensor) -> torch.Tensor:
    """Renumber the ids of ``labels`` to ``1..N`` in increasing order of their value; 0 stays 0."""
    values, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    if values.numel() > 0 and int(values[0]) == 0:
        return inverse
    return inverse + 1


def pad_to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Reflect-pad the spatial axes of ``(B, C, *S)`` at their end to multiples of ``stride``."""
    pad: list[int] = []
    needed = False
    for d in range(x.dim() - 1, 1, -1):
        extra = (stride - x.shape[d] % stride) % stride
        needed = needed or extra > 0
        pad += [0, extra]
    if not needed:
        return x
    return torch.nn.functional.pad(x, pad, mode="reflect")


class LabelPredictor(nn.Module):
    """Network plus clustering: a normalised image in, instance labels and seed map out.

    Parameters
    ----------
    net
        Maps ``(B, C, *S)`` (``S`` multiples of ``stride``) to raw outputs ``(B, 2D+1, *S)``.
    step
        Grid step per spatial axis (``D`` values).
    seed_thresh, fg_thresh, min_size
        Clustering thresholds (:func:`cluster`).
    max_radius
        Pixels per axis a seed's ellipse may reach (:func:`cluster`); empty: no limit.
    stride
        Inputs are reflect-padded at their end to multiples of this, outputs cropped back.

    Notes
    -----
    The forward pass returns ``(labels, seeds)``: int32 labels ``(B, 1, *S)`` numbered ``1..N``
    per image (0 = background) and float32 seediness ``(B, 1, *S)``. Labels are int32, not
    uint32: PyTorch's uint32 supports few operations, and Java consumers of TorchScript have
    no unsigned 32-bit type; 2**31 - 1 objects per image is ample.
    """

    max_radius: list[float]  # an empty list has no element type for TorchScript to infer

    def __init__(
        self,
        net: nn.Module,
        step: list[float],
        seed_thresh: float = 0.9,
        fg_thresh: float = 0.5,
        min_size: int = 10,
        stride: int = 8,
        max_radius: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.step: list[float] = [float(v) for v in step]
        self.seed_thresh = float(seed_thresh)
        self.fg_thresh = float(fg_thresh)
        self.min_size = int(min_size)
        self.stride = int(stride)
        self.max_radius: list[float] = [float(r) for r in max_radius] if max_radius else []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ndim = len(self.step)
        spatial: list[int] = list(x.shape[2:])
        raw = self.net(pad_to_stride(x.float(), self.stride))
        for d in range(ndim):
            raw = raw.narrow(d + 2, 0, spatial[d])
        labels: list[torch.Tensor] = []
        seeds: list[torch.Tensor] = []
        for b in range(x.shape[0]):
            one = raw[b].float().contiguous()
            found = cluster(one, self.step, self.seed_thresh, self.fg_thresh, self.min_size, self.max_radius)
            labels.append(relabel_sequential(found).to(torch.int32))
            seeds.append(torch.sigmoid(one[2 * ndim]))
        return torch.stack(labels).unsqueeze(1), torch.stack(seeds).unsqueeze(1)
