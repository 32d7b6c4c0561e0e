"""Spatial-embedding loss (Lovasz hinge + variance + seed), vectorised over objects and images.

The loss follows the method's definition per image (then averaged over the batch). For each
object ``k`` with pixels ``M_k`` and centre ``C_k``:

* ``sigma_bar_k`` = mean raw sigma over ``M_k`` (per axis), ``s_k = exp(10 * sigma_bar_k)``;
* ``var_k`` = mean over ``M_k`` and axes of ``(sigma - sigma_bar_k.detach()) ** 2``;
* ``phi_k`` = likelihood of every crop pixel's embedding under ``(C_k, s_k)``;
* ``inst_k`` = binary Lovasz hinge of logits ``2 * phi_k - 1`` against ``M_k`` over the crop;

and ``seed = [sum_bg seed**2 + fg_weight * sum_k sum_{M_k} (seed - phi_k.detach())**2] / #pixels``;
``loss_b = w_inst * mean_k inst_k + w_var * mean_k var_k + w_seed * seed`` (object terms 0 when
the image has no object).

Two formulations: on CPU tensors a compiled kernel (:mod:`embseg.loss_kernel`: loops over
pixels and objects, value and gradient in one pass, float64 arithmetic); elsewhere (CUDA,
``backend='torch'``) tensor operators. Both are tested against a literal per-object loop. The
tensor formulation, without a Python loop over images or objects:

* Per-object sums (pixel counts, sigma sums, centre coordinates, variances) are scatter-adds over
  the flattened label image (one slot per id; ids absent from an image give empty slots that are
  masked out, so ids need not be contiguous).
* A gradient-free selection finds the pairs that enter the Lovasz hinge: the object's own
  pixels, and the background pixels that can carry weight (below). With few ids (at most
  ``_DENSE_MAX_IDS``) it tests every (image, object, pixel) triple, a ``(B, K, N)`` pass
  (``K`` = largest id in the batch, ``N`` = pixels per crop); with more, the pixels are bucketed
  by embedding on a grid of cells and each object tests only the pixels of the cells its
  bounding box (in embedding space) touches: the same pairs, at a cost that follows the pairs
  near each object instead of ``K * N``. Everything with gradient is then computed on the
  selected pairs only.
* A background pixel's hinge error is ``2 * phi``, a foreground pixel's ``2 - 2 * phi``. A
  background pixel sorted after all foreground pixels of its object has Lovasz weight exactly 0
  (the Jaccard loss no longer changes once every foreground pixel is counted), so background
  pixels with ``phi < 1 - max_{M_k} phi`` are dropped **exactly**. Background pixels with
  ``phi < phi_cutoff`` (default ``1e-12``) are dropped as well; that changes an object's hinge by
  at most ``2 * phi_cutoff`` (tested equal to the full sum within 1e-5, values and gradients).
* The Lovasz hinge of all selected pairs is one flat sort by (object, decreasing error) (an
  int64 key from the float32 bits; no padding to the widest object). The Lovasz weights (the increments of the Jaccard loss along the sorted errors) are
  computed in closed form from the running counts of foreground ``a`` and background ``b``
  pixels: ``1 / (G + b)`` for a foreground pixel, ``(G - a) / ((G + b) (G + b - 1))`` for a
  background pixel (``G`` = object size), which is the standard ``jaccard[i] - jaccard[i - 1]``
  without the float cancellation of the difference.

Host synchronisations (they matter on a GPU only): reading the largest id when ``max_label`` is
not given (the data loader's collate can compute it on the CPU), whether some object has no
marked centre pixel (then the mean of its pixels is its centre), and the size of the selection
(``nonzero``, the grid shape and run lengths of the grid search, the widest row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from embseg import loss_kernel
from embseg.embedding import bandwidth, coordinates, embeddings, likelihood, split_raw

__all__ = ["DEFAULT_PHI_CUTOFF", "gt_center_iou", "lovasz_hinge_rows", "spatial_embedding_loss"]

#: Background pixels with a likelihood below this for an object are left out of that object's
#: Lovasz hinge (their hinge errors are at most ``2e-12``).
DEFAULT_PHI_CUTOFF = 1e-12
#: Up to this many ids per batch the pairs are selected by the dense ``(B, K, N)`` test (a few
#: cheap passes); above it by the embedding-space grid, whose per-candidate gathers cost more
#: per pair but scale with the pairs near each object instead of ``K``.
_DENSE_MAX_IDS = 16


class _Objects(NamedTuple):
    """Per-object quantities of a batch; slot ``i`` is instance id ``i`` (slot 0 = background)."""

    labels: torch.Tensor  # (B, N) int64 instance ids of the flattened crops
    counts: torch.Tensor  # (B, K + 1) pixel count per slot
    present: torch.Tensor  # (B, K) bool, id k + 1 has at least one pixel
    emb: torch.Tensor  # (B, D, N) embeddings
    sigmas: torch.Tensor  # (B, D, N) raw sigmas
    sigma_bar: torch.Tensor  # (B, D, K + 1) mean raw sigma per slot (0 for empty slots)
    centre: torch.Tensor  # (B, D, K + 1) centre coordinate per slot (no gradient)
    bandwidth: torch.Tensor  # (B, D, K + 1) s = exp(10 * sigma_bar)
    seed_logit: torch.Tensor  # (B, N) raw seed logits


def _resolve_max_label(instances: torch.Tensor, max_label: int | None) -> int:
    if max_label is not None:
        if max_label < 0:
            raise ValueError(f"max_label must be >= 0, got {max_label}")
        return int(max_label)
    return int(instances.max()) if instances.numel() else 0


def _check_shapes(
    raw: torch.Tensor, instances: torch.Tensor, centers: torch.Tensor, ndim: int
) -> tuple[int, tuple[int, ...]]:
    """Batch size and crop shape, after checking ``raw (B, 2D + 1, *S)`` against the label images."""
    if raw.dim() != ndim + 2 or raw.shape[1] != 2 * ndim + 1:
        raise ValueError(f"raw must be (B, {2 * ndim + 1}, *S) with {ndim} spatial axes, got {tuple(raw.shape)}")
    batch, spatial = raw.shape[0], tuple(raw.shape[2:])
    if tuple(instances.shape) != (batch, *spatial) or tuple(centers.shape) != (batch, *spatial):
        raise ValueError(
            f"instances {tuple(instances.shape)} and centers {tuple(centers.shape)} must be {(batch, *spatial)}"
        )
    return batch, spatial


def _objects(
    raw: torch.Tensor,
    instances: torch.Tensor,
    centers: torch.Tensor,
    step: Sequence[float],
    max_label: int | None,
) -> _Objects:
    ndim = len(step)
    batch, spatial = _check_shapes(raw, instances, centers, ndim)
    n_pixels = math.prod(spatial)
    n_ids = _resolve_max_label(instances, max_label)
    slots = n_ids + 1
    dtype, device = raw.dtype, raw.device

    # One split for all three parts: raw's gradient is written once (embedding.split_raw).
    offsets, sigmas, seed_logit = split_raw(raw, ndim)
    emb = embeddings(offsets, step).reshape(batch, ndim, n_pixels)
    sigmas = sigmas.reshape(batch, ndim, n_pixels)
    labels = instances.reshape(batch, n_pixels).long()
    centre_ids = centers.reshape(batch, n_pixels).long()
    # Centre pixels of ids beyond the label range cannot belong to any object.
    centre_ids = torch.where(centre_ids <= n_ids, centre_ids, 0)

    counts = torch.zeros(batch, slots, dtype=dtype, device=device).scatter_add_(
        1, labels, torch.ones((), dtype=dtype, device=device).expand(batch, n_pixels)
    )
    per_axis = labels.unsqueeze(1).expand(batch, ndim, n_pixels)
    sigma_sum = torch.zeros(batch, ndim, slots, dtype=dtype, device=device).scatter_add(2, per_axis, sigmas)
    sigma_bar = sigma_sum / counts.clamp(min=1).unsqueeze(1)

    # Centres: mean coordinate of the pixels marked in `centers` (one per object from the data
    # pipeline), else the mean coordinate of the object's pixels. Sums in float64: exact enough
    # for means over large objects.
    # Only the marked pixels are visited (a few per crop), and the member means only when some
    # object has no marked pixel.
    grid = coordinates(spatial, step, device=device, dtype=torch.float64).reshape(ndim, n_pixels)
    marked_image, marked_pixel = centre_ids.nonzero(as_tuple=True)
    marked_id = centre_ids[marked_image, marked_pixel]
    marked_slot = marked_image * slots + marked_id
    centre_sum = torch.zeros(ndim, batch * slots, dtype=torch.float64, device=device).index_add_(
        1, marked_slot, grid.index_select(1, marked_pixel)
    ).view(ndim, batch, slots).transpose(0, 1)
    centre_count = torch.zeros(batch * slots, dtype=torch.float64, device=device).index_add_(
        0, marked_slot, torch.ones_like(marked_slot, dtype=torch.float64)
    ).view(batch, slots)
    centre = centre_sum / centre_count.clamp(min=1).unsqueeze(1)
    unmarked = (centre_count[:, 1:] == 0) & (counts[:, 1:] > 0)
    if bool(unmarked.any()):  # host sync
        member_sum = torch.zeros(batch, ndim, slots, dtype=torch.float64, device=device).scatter_add_(
            2, per_axis, grid.unsqueeze(0).expand(batch, ndim, n_pixels)
        )
        centre = torch.where(
            centre_count.unsqueeze(1) > 0, centre, member_sum / counts.to(torch.float64).clamp(min=1).unsqueeze(1)
        )
    centre = centre.to(dtype)
    s = bandwidth(sigma_bar)
    return _Objects(labels, counts, counts[:, 1:] > 0, emb, sigmas, sigma_bar, centre, s,
                    seed_logit.reshape(batch, n_pixels))


def _members(objects: _Objects) -> torch.Tensor:
    """``(B, K, N)`` bool: pixel ``n`` belongs to id ``k + 1``."""
    n_ids = objects.present.shape[1]
    ids = torch.arange(1, n_ids + 1, device=objects.labels.device).view(1, n_ids, 1)
    return objects.labels.unsqueeze(1) == ids


@torch.no_grad()
def _exponent(objects: _Objects) -> torch.Tensor:
    """``(B, K, N)`` exponent ``sum_d s_d (e_d - C_d) ** 2`` of every pixel for every object.

    Gradient-free and with few full-size passes: it only selects the pairs that matter (and gives
    the membership test ``phi > 0.5`` as ``exponent < ln 2`` for the IoU proxy).
    """
    emb = objects.emb.detach()
    centre = objects.centre[:, :, 1:]
    root = objects.bandwidth[:, :, 1:].detach().sqrt()
    batch, ndim, n_pixels = emb.shape
    shape = (batch, centre.shape[2], n_pixels)
    q = torch.empty(shape, dtype=emb.dtype, device=emb.device)
    t = torch.empty_like(q)
    for d in range(ndim):
        # sqrt(s) * e - sqrt(s) * C, then accumulate its square.
        torch.addcmul(
            (-root[:, d] * centre[:, d]).unsqueeze(2), root[:, d].unsqueeze(2), emb[:, d].unsqueeze(1), out=t
        )
        if d == 0:
            torch.mul(t, t, out=q)
        else:
            q.addcmul_(t, t)
    return q


def _own_likelihood(objects: _Objects) -> torch.Tensor:
    """``(B, N)`` likelihood of every foreground pixel for its own object (0 on background).

    Computed on the foreground pixels only (often a few % of a crop), with the same arithmetic
    per pixel as on the whole map.
    """
    labels = objects.labels
    batch, _, n_pixels = objects.emb.shape
    image, pixel = (labels > 0).nonzero(as_tuple=True)
    own = labels[image, pixel]
    emb = objects.emb.detach()[image, :, pixel]  # (F, D)
    centre = objects.centre[image, :, own]
    s = objects.bandwidth.detach()[image, :, own]
    phi = likelihood(emb.T, centre.T, s.T)
    return torch.zeros(batch, n_pixels, dtype=phi.dtype, device=phi.device).index_put_((image, pixel), phi)


def _lovasz_weights(
    errors: torch.Tensor, fg: torch.Tensor, row: torch.Tensor, n_rows: int, row_fg: torch.Tensor
) -> torch.Tensor:
    """Lovasz weight of every element of ragged rows given as flat elements grouped by ``row``.

    The Lovasz hinge of a row is ``sum(relu(errors) * weight)`` over its elements.

    Parameters
    ----------
    errors
        ``(A,)`` hinge errors ``1 - logit * sign`` (values only; no gradient is taken).
    fg
        ``(A,)`` bool labels.
    row
        ``(A,)`` int64 row of each element (any order).
    n_rows
        Number of rows.
    row_fg
        ``(n_rows,)`` foreground count ``G`` per row (rows may omit background elements whose
        weight is 0, never foreground ones).

    Returns
    -------
    torch.Tensor
        ``(A,)`` weights, the Jaccard-loss increments at each element's rank in its row sorted by
        decreasing error.
    """
    errors = errors.detach()
    if errors.numel() == 0:
        return torch.zeros_like(errors)
    n = row.numel()
    per_row = torch.bincount(row, minlength=n_rows)
    start = torch.cumsum(per_row, 0) - per_row
    width = int(per_row.max())
    order = _row_descending_order(errors, row)
    row = row.index_select(0, order)  # now non-decreasing: the rows of the sorted elements
    fg_sorted = fg.index_select(0, order)
    # Counts are exact integers in float32 below 2**24.
    count_dtype = errors.dtype if width < 2**24 else torch.float64
    row_start = start.index_select(0, row)
    fg_cum = fg_sorted.cumsum(0, dtype=count_dtype)
    fg_before = (fg_cum - fg_sorted.to(count_dtype)).index_select(0, start.clamp(max=n - 1))
    fg_seen = fg_cum - fg_before.index_select(0, row)  # a
    rank = (torch.arange(n, device=row.device) - row_start + 1).to(count_dtype)
    total = row_fg.to(count_dtype).index_select(0, row)  # G
    union = total + (rank - fg_seen)  # G + b
    weight_fg = union.reciprocal()
    weight_bg = (total - fg_seen).div_((union * (union - 1)).clamp_(min=1))
    # A row without foreground: the Jaccard loss is 1 from its first element on.
    weight_bg = torch.where((rank == 1) & (total == 0), 1.0, weight_bg)
    weight_sorted = torch.where(fg_sorted, weight_fg, weight_bg).to(errors.dtype)
    return torch.empty_like(weight_sorted).index_put_((order,), weight_sorted)


def _row_descending_order(errors: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Permutation sorting flat elements by ``row``, then by decreasing ``errors`` within a
    row; one flat sort, no padding to the widest row.

    Hinge errors are ``>= 0``, and the bit patterns of non-negative float32 values order as the
    values, so in float32 one int64 key ``(row, ~bits)`` does it; otherwise two stable sorts.
    """
    if errors.dtype == torch.float32 and bool((errors >= 0).all()):
        bits = errors.view(torch.int32).to(torch.int64)
        key = row * 2**31 + (2**31 - 1 - bits)
        return torch.argsort(key, stable=True)
    by_error = torch.argsort(errors, descending=True, stable=True)
    return by_error.index_select(0, torch.argsort(row.index_select(0, by_error), stable=True))


class _SelectedHinge(torch.autograd.Function):
    """Lovasz hinge per object over selected (object, pixel) pairs.

    Forward: ``phi`` of every pair (:func:`embseg.embedding.likelihood`), hinge errors, Lovasz
    weights, loss per object. The backward is written out (``phi = exp(-q)``,
    ``q = sum_d s_d (e_d - C_d) ** 2``) so that only ``phi`` times the hinge slope is kept per
    pair, instead of autograd's intermediates.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        emb: torch.Tensor,
        s: torch.Tensor,
        centre: torch.Tensor,
        pixel: torch.Tensor,
        row: torch.Tensor,
        fg: torch.Tensor,
        row_fg: torch.Tensor,
    ) -> torch.Tensor:
        # emb (P, D) per pixel; s and centre (R, D) per object; pixel, row, fg (A,) per pair.
        phi = likelihood(emb.index_select(0, pixel).T, centre.index_select(0, row).T, s.index_select(0, row).T)
        errors = 1 - (2 * phi - 1) * (fg.to(phi.dtype) * 2 - 1)
        n_rows = s.shape[0]
        weight = _lovasz_weights(errors, fg, row, n_rows, row_fg)
        loss = phi.new_zeros(n_rows).index_add_(0, row, torch.relu(errors) * weight)
        # d loss / d phi for a unit upstream gradient (relu'(0) = 0, as autograd), times phi.
        slope = torch.where(errors > 0, weight, 0).mul_(torch.where(fg, -2.0, 2.0)).mul_(phi)
        ctx.save_for_backward(emb, s, centre, pixel, row, slope)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: torch.Tensor):  # type: ignore[override]
        emb, s, centre, pixel, row, slope = ctx.saved_tensors
        # d loss / d q = -phi * d loss / d phi.
        dq = grad_rows.index_select(0, row).mul_(slope).neg_().unsqueeze(1)
        diff = emb.index_select(0, pixel).sub_(centre.index_select(0, row))  # e - C, (A, D)
        grad_emb = grad_s = None
        if ctx.needs_input_grad[0]:
            g = diff * s.index_select(0, row) * (2 * dq)
            grad_emb = torch.zeros_like(emb).index_add_(0, pixel, g)
        if ctx.needs_input_grad[1]:
            grad_s = torch.zeros_like(s).index_add_(0, row, diff.square_().mul_(dq))
        return grad_emb, grad_s, None, None, None, None, None


def lovasz_hinge_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge of every row (last axis) of ``logits`` against boolean ``labels``.

    Parameters
    ----------
    logits
        ``(..., N)`` float logits.
    labels
        ``(..., N)`` bool ground truth.

    Returns
    -------
    torch.Tensor
        ``(...)`` loss per row: ``dot(relu(errors_sorted), lovasz_grad(labels_sorted))`` with
        ``errors = 1 - logits * (2 * labels - 1)`` sorted in descending order. The gradient flows
        through the errors only. A row without foreground gives ``relu`` of its largest error.
    """
    lead, n = logits.shape[:-1], logits.shape[-1]
    n_rows = math.prod(lead)
    flat = logits.reshape(n_rows, n)
    fg = labels.reshape(n_rows, n).bool()
    errors = 1 - flat * (fg.to(flat.dtype) * 2 - 1)
    row = torch.arange(n_rows, device=flat.device).repeat_interleave(n)
    errors = errors.reshape(-1)
    with torch.no_grad():
        weight = _lovasz_weights(errors, fg.reshape(-1), row, n_rows, fg.sum(1))
    loss = errors.new_zeros(n_rows).index_add(0, row, torch.relu(errors) * weight)
    return loss.reshape(lead)


def spatial_embedding_loss(
    raw: torch.Tensor,
    instances: torch.Tensor,
    centers: torch.Tensor,
    step: Sequence[float],
    fg_weight: float,
    w_inst: float = 1.0,
    w_var: float = 10.0,
    w_seed: float = 1.0,
    *,
    max_label: int | None = None,
    phi_cutoff: float = DEFAULT_PHI_CUTOFF,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Spatial-embedding loss of a batch of crops.

    Parameters
    ----------
    raw
        ``(B, 2D + 1, *S)`` raw network outputs (offsets, raw sigmas, seed logit; array-axis order).
    instances
        ``(B, *S)`` integer instance ids, 0 = background. Ids need not be contiguous: ids with no
        pixel in an image are ignored.
    centers
        ``(B, *S)`` integer image holding, at each object's centre pixel, that object's id (0
        elsewhere). The centre ``C_k`` is the coordinate of that pixel (the mean coordinate if
        several pixels carry the id); an object without a centre pixel falls back to the mean
        coordinate of its pixels.
    step
        Grid step per array axis (:func:`embseg.embedding.grid_step`); coordinates start at 0 at
        the crop's first pixel.
    fg_weight
        Weight of the foreground pixels in the seed term.
    w_inst, w_var, w_seed
        Weights of the Lovasz (instance), variance and seed terms.
    max_label
        Largest instance id in the batch, or any upper bound. When None it is read from
        ``instances``. Ids above it must not occur.
    phi_cutoff
        Background pixels with ``phi_k`` below this are left out of object ``k``'s Lovasz hinge
        (see :data:`DEFAULT_PHI_CUTOFF`); 0 keeps every pixel (the literal definition).
    backend
        ``'compiled'``: the numba kernel of :mod:`embseg.loss_kernel` (CPU tensors only; value
        and gradient in one pass, arithmetic in float64; non-finite offsets or sigmas are left
        to the torch formulation, whose loss is then non-finite). ``'torch'``: tensor operators
        (any device). ``'auto'`` (default): compiled for CPU tensors when numba is available and
        the call is not traced or compiled, else torch.

    Returns
    -------
    loss
        Scalar: mean over the batch of the per-image losses. It depends on every element of
        ``raw`` (zero gradient where the loss does not), also for crops without objects.
    parts
        Detached batch means of the unweighted terms: ``'instance'``, ``'variance'``, ``'seed'``.

    Notes
    -----
    Cost: a gradient-free selection (dense over ``(B, K, N)`` for few ids, else an
    embedding-space grid search, see :func:`_select_pairs`) of the pairs that matter: an object's own pixels and the background pixels
    with ``phi >= max(1 - max_{M_k} phi, phi_cutoff)`` (below the first bound a background pixel
    has Lovasz weight exactly 0; see the module docstring). Everything with gradient, including
    one batched row sort, runs on the selected pairs only; the backward of the hinge is written
    out and keeps one float per pair. When the bandwidths are small compared with the crop
    (big objects, early training) nearly every pair is selected and the cost is that of the
    literal definition, dominated by the sort. Host synchronisations (GPU only): the selection
    size, the grid search's sizes, the widest row, and the largest id when ``max_label`` is not
    given.
    Half-precision ``raw`` is computed in float32.

    Examples
    --------
    >>> raw = torch.zeros(1, 5, 16, 16, requires_grad=True)
    >>> instances = torch.zeros(1, 16, 16, dtype=torch.long)
    >>> instances[0, 4:8, 4:8] = 1
    >>> centers = torch.zeros_like(instances)
    >>> centers[0, 6, 6] = 1
    >>> loss, parts = spatial_embedding_loss(raw, instances, centers, (1 / 1023, 1 / 1023), 10.0)
    >>> loss.backward()
    """
    if raw.dtype in (torch.float16, torch.bfloat16):
        raw = raw.float()  # exp(10 * sigma) and the Lovasz weights need float32
    if _use_compiled(raw, backend):
        compiled = _compiled_loss(raw, instances, centers, step, fg_weight, w_inst, w_var, w_seed, max_label,
                                  phi_cutoff)
        if compiled is not None:
            return compiled
    objects = _objects(raw, instances, centers, step, max_label)
    ndim = len(step)
    batch = raw.shape[0]
    labels, present = objects.labels, objects.present
    n_ids, n_pixels = present.shape[1], labels.shape[1]
    n_objects = present.sum(1).clamp(min=1).to(raw.dtype)

    with torch.no_grad():
        own_phi = _own_likelihood(objects)  # (B, N), the seed targets
        pair = _select_pairs(objects, own_phi, phi_cutoff)  # flat indices into (B, K, N)
        row = pair // n_pixels  # image * K + object
        image = row // n_ids
        flat_pixel = pair - (row - image) * n_pixels  # image * N + pixel
        fg = labels.reshape(-1).index_select(0, flat_pixel) == row - image * n_ids + 1
        present_rows = present.reshape(-1).nonzero().squeeze(1)
        compact_row = (torch.cumsum(present.reshape(-1), 0) - 1).index_select(0, row)

    # Lovasz hinge of every object over the selected (object, pixel) pairs.
    emb = objects.emb.transpose(1, 2).reshape(batch * n_pixels, ndim)
    s = objects.bandwidth[:, :, 1:].transpose(1, 2).reshape(batch * n_ids, ndim)[present_rows]
    centre = objects.centre[:, :, 1:].transpose(1, 2).reshape(batch * n_ids, ndim)[present_rows]
    row_fg = objects.counts[:, 1:].reshape(-1)[present_rows]
    inst_present = _SelectedHinge.apply(emb, s, centre, flat_pixel, compact_row, fg, row_fg)
    inst = raw.new_zeros(batch * n_ids).index_put((present_rows,), inst_present).view(batch, n_ids)
    inst_mean = inst.sum(1) / n_objects

    own_bar = objects.sigma_bar.detach().gather(2, labels.unsqueeze(1).expand(batch, ndim, n_pixels))
    sq = ((objects.sigmas - own_bar) ** 2).sum(1)  # (B, N)
    var_sum = torch.zeros_like(objects.counts).scatter_add(1, labels, sq)[:, 1:]
    var = var_sum / (objects.counts[:, 1:].clamp(min=1) * ndim)
    var_mean = torch.where(present, var, 0).sum(1) / n_objects

    seed = torch.sigmoid(objects.seed_logit)
    seed_px = torch.where(labels > 0, fg_weight * (seed - own_phi) ** 2, seed**2)
    seed_term = seed_px.sum(1) / n_pixels

    per_image = w_inst * inst_mean + w_var * var_mean + w_seed * seed_term
    # The seed term reaches every image, and the split's backward fills the channel groups that
    # got no gradient with zeros: the gradient covers all of raw.
    loss = per_image.mean()
    parts = {
        "instance": inst_mean.detach().mean(),
        "variance": var_mean.detach().mean(),
        "seed": seed_term.detach().mean(),
    }
    return loss, parts


def _use_compiled(raw: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "compiled", "torch"):
        raise ValueError(f"backend must be 'auto', 'compiled' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    applies = (
        raw.device.type == "cpu" and raw.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_tracing() and not (is_compiling is not None and is_compiling())
    )
    if backend == "compiled":
        if not loss_kernel.AVAILABLE:
            raise RuntimeError("backend='compiled' needs numba (pip install numba)")
        if not applies:
            raise ValueError(f"backend='compiled' runs on CPU float tensors, got {raw.dtype} on {raw.device}")
        return True
    return applies and loss_kernel.AVAILABLE


class _KnownGradient(torch.autograd.Function):
    """The batch loss from per-image terms computed outside autograd, attached to ``raw`` with
    its gradient computed along with them; the backward scales that gradient by the upstream
    one (and can run once per forward: it hands the gradient over, which autograd can then take
    without a copy)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        raw: torch.Tensor,
        per_image: torch.Tensor,
        weights: torch.Tensor,
        grad: torch.Tensor,
    ) -> torch.Tensor:
        ctx.grad = grad
        return (per_image @ weights).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the compiled loss's backward runs once per forward (its gradient was already "
                               "handed over); for retain_graph use spatial_embedding_loss(..., backend='torch')")
        ctx.grad = None
        if not bool(grad_loss == 1):  # scaled losses: virtual batches, gradient scalers
            grad.mul_(grad_loss)
        return grad, None, None, None


def _compiled_loss(
    raw: torch.Tensor,
    instances: torch.Tensor,
    centers: torch.Tensor,
    step: Sequence[float],
    fg_weight: float,
    w_inst: float,
    w_var: float,
    w_seed: float,
    max_label: int | None,
    phi_cutoff: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The loss by :func:`embseg.loss_kernel.loss_and_gradient`; None when ``raw`` has
    non-finite offsets or sigmas (the torch formulation then gives its non-finite loss)."""
    ndim = len(step)
    batch, spatial = _check_shapes(raw, instances, centers, ndim)
    n_ids = _resolve_max_label(instances, max_label)
    steps = tuple(float(h) for h in (step.tolist() if isinstance(step, torch.Tensor) else step))
    labels = instances.reshape(batch, -1).to(torch.int64).contiguous()
    marks = centers.reshape(batch, -1).to(torch.int64).contiguous()
    flat = raw.detach().contiguous().view(batch, raw.shape[1], -1)
    tanh_offsets = torch.tanh(flat[:, :ndim])  # vectorised here: the kernel's scalar ones cost more
    seediness = torch.sigmoid(flat[:, 2 * ndim])
    need_grad = raw.requires_grad and torch.is_grad_enabled()
    result = loss_kernel.loss_and_gradient(
        flat.numpy(), tanh_offsets.numpy(), seediness.numpy(), labels.numpy(), marks.numpy(), spatial, steps, n_ids,
        fg_weight, w_inst, w_var, w_seed, phi_cutoff, need_grad=need_grad, n_threads=torch.get_num_threads(),
    )
    if result is None:
        return None
    terms, grad = result
    per_image = torch.from_numpy(terms).to(raw.dtype)
    weights = torch.tensor([w_inst, w_var, w_seed], dtype=raw.dtype)
    if need_grad:
        loss = _KnownGradient.apply(raw, per_image, weights, torch.from_numpy(grad).view(raw.shape))
    else:
        loss = (per_image @ weights).mean()
    means = per_image.mean(0)
    return loss, {"instance": means[0], "variance": means[1], "seed": means[2]}


def _query_limit(objects: _Objects, own_phi: torch.Tensor, phi_cutoff: float) -> torch.Tensor:
    """``(B, K)`` bound on the exponent ``q`` below which a background pixel enters a hinge.

    ``phi >= max(1 - max_{M_k} phi, phi_cutoff)`` (with a small margin for the rounding between
    the two ways ``phi`` is computed), in exponent space (``phi = exp(-q)``); ``+inf`` keeps every
    background pixel.
    """
    best = torch.zeros_like(objects.counts).scatter_reduce_(1, objects.labels, own_phi, "amax")[:, 1:]
    eps = torch.finfo(own_phi.dtype).eps
    keep = ((1 - best) * (1 - 1e-3) - 4 * eps).clamp(min=max(phi_cutoff, 0.0))
    return -torch.log(keep) + 1e-4


def _select_pairs(objects: _Objects, own_phi: torch.Tensor, phi_cutoff: float) -> torch.Tensor:
    """Flat indices ``(A,)`` into ``(B, K, N)`` of the (object, pixel) pairs for the Lovasz hinge
    (each pair once, in no particular order).

    Every foreground pixel of its own object, and the background pixels with exponent
    ``q < limit`` (:func:`_query_limit`). Background pixels below the bound sort after all of the
    object's foreground pixels, where the Lovasz weight is exactly 0, or are under the cutoff.

    Search: ``q < limit`` implies ``|e_d - C_d| < sqrt(limit / s_d)`` on every axis, a box in
    embedding space. The pixels are bucketed once by their embedding on a regular grid of cells
    (one counting sort of the batch); each object tests exactly only the pixels of the cells
    its box touches. Equal to the dense test over all ``(object, pixel)`` pairs
    (:func:`_select_pairs_dense`), at a cost of the pairs near each object instead of
    ``B * K * N``.
    """
    emb = objects.emb.detach()
    batch, ndim, n_pixels = emb.shape
    n_ids = objects.present.shape[1]
    device = emb.device
    limit = _query_limit(objects, own_phi, phi_cutoff)
    # Members: every foreground pixel with its own object.
    labels = objects.labels.reshape(-1)
    fg_pixel = (labels > 0).nonzero().squeeze(1)
    fg_row = (fg_pixel // n_pixels) * n_ids + labels.index_select(0, fg_pixel) - 1
    members = fg_row * n_pixels + fg_pixel % n_pixels
    if n_ids <= _DENSE_MAX_IDS:
        # One dense pass over (B, K, N); absent objects get no candidates (limit -inf).
        open_limit = torch.where(objects.present, limit, -math.inf)
        chosen = (_exponent(objects) < open_limit.unsqueeze(2)).view(-1).nonzero().squeeze(1)
        row = chosen // n_pixels
        pixel = (row // n_ids) * n_pixels + chosen % n_pixels
        own = labels.index_select(0, pixel) == row % n_ids + 1
        return torch.cat([members, chosen[~own]])
    rows = objects.present.reshape(-1).nonzero().squeeze(1)  # b * K + k of the present objects
    if rows.numel() == 0:
        return members
    centre = objects.centre[:, :, 1:].transpose(1, 2).reshape(-1, ndim).index_select(0, rows)
    s = objects.bandwidth[:, :, 1:].detach().transpose(1, 2).reshape(-1, ndim).index_select(0, rows)
    row_limit = limit.reshape(-1).index_select(0, rows)
    # Half-widths of the boxes (a relative margin against rounding); inf covers everything.
    half = torch.sqrt(row_limit.unsqueeze(1) / s) * (1 + 1e-5)
    half = torch.where(torch.isfinite(half), half, torch.full_like(half, math.inf))
    flat_emb = emb.transpose(1, 2).reshape(-1, ndim)  # (B * N, D)
    box_lo = centre - half
    box_hi = centre + half
    # Grid over the part of embedding space any box reaches (pixels outside it are never
    # candidates). Cells a quarter of the median box wide, at most ~2 cells per pixel.
    e_lo = flat_emb.min(0).values
    e_hi = flat_emb.max(0).values
    lo = torch.maximum(box_lo.min(0).values, e_lo)
    hi = torch.minimum(box_hi.max(0).values, e_hi)
    span = (hi - lo).clamp(min=0)
    cell = half.median(0).values / 2
    cell = torch.where(torch.isfinite(cell), cell, span)
    cell = torch.maximum(cell, span / 4096).clamp(min=1e-12)
    n_cells = (span / cell).floor().long() + 1
    budget = 2 * n_pixels
    total = float(n_cells.double().prod())
    if total > budget:
        cell = cell * (total / budget) ** (1.0 / ndim)
        n_cells = (span / cell).floor().long() + 1
    n_cells_list = [int(n) for n in n_cells]  # host sync (a few ints)
    per_image = math.prod(n_cells_list)
    strides = [math.prod(n_cells_list[d + 1 :]) for d in range(ndim)]
    # Cell of every pixel (sentinel past the end for pixels outside the grid).
    pos = (flat_emb - lo) / cell
    inside = ((flat_emb >= lo) & (flat_emb <= hi)).all(1)
    idx = pos.floor().long()
    idx = torch.minimum(idx.clamp(min=0), n_cells - 1)
    pixel_cell = (idx * torch.tensor(strides, device=device)).sum(1)
    pixel_cell += torch.arange(batch, device=device).repeat_interleave(n_pixels) * per_image
    sentinel = batch * per_image
    pixel_cell = torch.where(inside, pixel_cell, sentinel)
    order = torch.argsort(pixel_cell, stable=True)
    counts = torch.bincount(pixel_cell, minlength=sentinel + 1)
    starts = torch.zeros(sentinel + 2, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=starts[1:])
    # Cell range of every box, per axis.
    c0 = torch.minimum(((box_lo - lo) / cell).floor().clamp(min=0).nan_to_num(0).long(), n_cells - 1)
    c1 = torch.minimum(((box_hi - lo) / cell).floor().clamp(min=0).nan_to_num(0, posinf=0).long(), n_cells - 1)
    c1 = torch.where(torch.isinf(box_hi), n_cells - 1, c1)
    c0 = torch.where(torch.isinf(box_lo), 0, c0)
    extent = c1 - c0 + 1  # (R, D)
    # One run of consecutive cells along the last axis per combination of the leading axes.
    lead = extent[:, :-1].prod(1) if ndim > 1 else torch.ones(rows.numel(), dtype=torch.long, device=device)
    run_obj = torch.repeat_interleave(torch.arange(rows.numel(), device=device), lead)
    local = torch.arange(run_obj.numel(), device=device) - (torch.cumsum(lead, 0) - lead).index_select(0, run_obj)
    image = rows // n_ids
    first = image.index_select(0, run_obj) * per_image + c0[:, -1].index_select(0, run_obj)
    for d in range(ndim - 2, -1, -1):
        ext = extent[:, d].index_select(0, run_obj)
        first += (c0[:, d].index_select(0, run_obj) + local % ext) * strides[d]
        local = local // ext
    last = first + extent[:, -1].index_select(0, run_obj) - 1
    run_start = starts.index_select(0, first)
    run_len = starts.index_select(0, last + 1) - run_start
    cand_obj = torch.repeat_interleave(run_obj, run_len)
    offset = torch.arange(cand_obj.numel(), device=device) - (torch.cumsum(run_len, 0) - run_len).index_select(
        0, torch.repeat_interleave(torch.arange(run_obj.numel(), device=device), run_len)
    )
    cand_pixel = order.index_select(0, run_start.repeat_interleave(run_len) + offset)  # b * N + n
    # The exact test, the same arithmetic as _exponent: sum_d (sqrt(s) e - sqrt(s) C) ** 2.
    root = s.sqrt()
    t = torch.addcmul(
        (-root * centre).index_select(0, cand_obj), root.index_select(0, cand_obj),
        flat_emb.index_select(0, cand_pixel),
    )
    q = t.square_().sum(1)
    cand_row = rows.index_select(0, cand_obj)
    own = labels.index_select(0, cand_pixel) == cand_row % n_ids + 1
    keep = (q < row_limit.index_select(0, cand_obj)) & ~own
    chosen = cand_row[keep] * n_pixels + cand_pixel[keep] % n_pixels
    return torch.cat([members, chosen])


def _select_pairs_dense(objects: _Objects, own_phi: torch.Tensor, phi_cutoff: float) -> torch.Tensor:
    """:func:`_select_pairs` by the dense ``(B, K, N)`` test (for tests and as a definition)."""
    limit = _query_limit(objects, own_phi, phi_cutoff)
    active = (_exponent(objects) < limit.unsqueeze(2)) & objects.present.unsqueeze(2)
    active |= _members(objects)
    return active.view(-1).nonzero().squeeze(1)


@torch.no_grad()
def gt_center_iou(
    raw: torch.Tensor,
    instances: torch.Tensor,
    centers: torch.Tensor,
    step: Sequence[float],
    *,
    max_label: int | None = None,
) -> torch.Tensor:
    """IoU of ``phi_k > 0.5`` with ``M_k`` per object, the cheap validation proxy.

    ``phi_k`` uses the ground-truth centre and the object's mean sigma, exactly as in the loss
    (membership tested as ``exponent < ln 2``, the same as ``phi > 0.5`` up to rounding).

    Returns
    -------
    torch.Tensor
        ``(n_objects,)`` IoUs of the objects present in the batch, ordered by image, then id.
    """
    objects = _objects(raw, instances, centers, step, max_label)
    predicted = _exponent(objects) < math.log(2.0)
    members = _members(objects)
    inter = (predicted & members).sum(-1)
    union = (predicted | members).sum(-1)
    iou = inter.to(raw.dtype) / union.clamp(min=1).to(raw.dtype)
    return iou[objects.present]
