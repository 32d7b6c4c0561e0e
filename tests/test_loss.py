"""Tests of the vectorised spatial-embedding loss against a literal per-object loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embseg import loss_kernel
from embseg.embedding import grid_step
from embseg.loss import (
    _DENSE_MAX_IDS,
    _objects,
    _own_likelihood,
    _select_pairs,
    _select_pairs_dense,
    _use_compiled,
    gt_center_iou,
    lovasz_hinge_rows,
    spatial_embedding_loss,
)

torch.set_num_threads(1)

DATA = Path("/work/shared/data")

#: Both formulations of the loss: tensor operators and the compiled kernel (embseg.loss_kernel).
BACKENDS = [
    "torch",
    pytest.param("compiled", marks=pytest.mark.skipif(not loss_kernel.AVAILABLE, reason="numba not available")),
]


# ---------------------------------------------------------------------------------------------
# Reference: written plainly, one image and one object at a time.


def reference_lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge of one flat row, the textbook way (sort, cumulative sums, differences)."""
    labels = labels.to(logits.dtype)
    signs = 2 * labels - 1
    errors = 1 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    gt_sorted = labels[perm]
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    grad = jaccard.clone()
    grad[1:] = jaccard[1:] - jaccard[:-1]
    return torch.dot(torch.relu(errors_sorted), grad)


def reference_loss(raw, instances, centers, step, fg_weight, w_inst=1.0, w_var=10.0, w_seed=1.0):
    ndim = len(step)
    batch = raw.shape[0]
    shape = raw.shape[2:]
    axes = [torch.arange(n, dtype=raw.dtype) * h for n, h in zip(shape, step, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    total = 0
    inst_parts, var_parts, seed_parts = [], [], []
    for b in range(batch):
        offsets = raw[b, :ndim]
        sigma = raw[b, ndim : 2 * ndim]
        seed = torch.sigmoid(raw[b, 2 * ndim])
        emb = torch.tanh(offsets) + grid
        labels = instances[b]
        ids = [int(i) for i in torch.unique(labels) if i != 0]
        seed_loss = (seed[labels == 0] ** 2).sum()
        inst_loss = torch.zeros((), dtype=raw.dtype)
        var_loss = torch.zeros((), dtype=raw.dtype)
        for i in ids:
            mask = labels == i
            centre_mask = centers[b] == i
            if centre_mask.any():
                centre = grid[:, centre_mask].mean(1)
            else:
                centre = grid[:, mask].mean(1)
            sigma_in = sigma[:, mask]
            sigma_bar = sigma_in.mean(1)
            var_loss = var_loss + ((sigma_in - sigma_bar.detach()[:, None]) ** 2).mean()
            s = torch.exp(10 * sigma_bar)
            view = (ndim,) + (1,) * ndim
            phi = torch.exp(-(s.view(view) * (emb - centre.view(view)) ** 2).sum(0))
            inst_loss = inst_loss + reference_lovasz_hinge((2 * phi - 1).flatten(), mask.flatten())
            seed_loss = seed_loss + fg_weight * ((seed[mask] - phi[mask].detach()) ** 2).sum()
        if ids:
            inst_loss = inst_loss / len(ids)
            var_loss = var_loss / len(ids)
        seed_loss = seed_loss / labels.numel()
        total = total + w_inst * inst_loss + w_var * var_loss + w_seed * seed_loss
        inst_parts.append(inst_loss.detach())
        var_parts.append(var_loss.detach())
        seed_parts.append(seed_loss.detach())
    parts = {
        "instance": torch.stack(inst_parts).mean(),
        "variance": torch.stack(var_parts).mean(),
        "seed": torch.stack(seed_parts).mean(),
    }
    return total / batch, parts


def reference_iou(raw, instances, centers, step):
    ndim = len(step)
    shape = raw.shape[2:]
    axes = [torch.arange(n, dtype=raw.dtype) * h for n, h in zip(shape, step, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    out = []
    for b in range(raw.shape[0]):
        emb = torch.tanh(raw[b, :ndim]) + grid
        sigma = raw[b, ndim : 2 * ndim]
        for i in [int(i) for i in torch.unique(instances[b]) if i != 0]:
            mask = instances[b] == i
            centre_mask = centers[b] == i
            centre = grid[:, centre_mask].mean(1) if centre_mask.any() else grid[:, mask].mean(1)
            s = torch.exp(10 * sigma[:, mask].mean(1))
            view = (ndim,) + (1,) * ndim
            phi = torch.exp(-(s.view(view) * (emb - centre.view(view)) ** 2).sum(0))
            pred = phi > 0.5
            out.append(float((pred & mask).sum()) / float((pred | mask).sum()))
    return torch.tensor(out, dtype=raw.dtype)


# ---------------------------------------------------------------------------------------------
# Inputs


def random_labels(rng, shape, n_objects, first_id=1, id_gap=1):
    """Random boxes with ids first_id, first_id + id_gap, ...; centres at a random own pixel."""
    labels = np.zeros(shape, np.int64)
    ids = [first_id + j * id_gap for j in range(n_objects)]
    for i in ids:
        lo = [rng.integers(0, max(s - 3, 1)) for s in shape]
        size = [rng.integers(2, max(3, s // 3)) for s in shape]
        labels[tuple(slice(a, a + z) for a, z in zip(lo, size, strict=True))] = i
    centers = np.zeros(shape, np.int64)
    for i in ids:
        where = np.argwhere(labels == i)
        if len(where):
            centers[tuple(where[rng.integers(len(where))])] = i
    return labels, centers


def make_raw(rng, batch, ndim, shape, dtype, offset_scale, sigma_mean, sigma_scale=0.05):
    raw = rng.normal(size=(batch, 2 * ndim + 1, *shape))
    raw[:, :ndim] *= offset_scale
    raw[:, ndim : 2 * ndim] = sigma_mean + sigma_scale * raw[:, ndim : 2 * ndim]
    return torch.tensor(raw, dtype=dtype)


def synthetic_batch(ndim, seed=0):
    """A batch with: normal objects, an empty image, an object without centre, id gaps."""
    rng = np.random.default_rng(seed)
    shape = (24, 32) if ndim == 2 else (6, 12, 16)
    labels, centers = [], []
    lab, cen = random_labels(rng, shape, 4)
    labels.append(lab)
    centers.append(cen)
    labels.append(np.zeros(shape, np.int64))  # no objects
    centers.append(np.zeros(shape, np.int64))
    lab, cen = random_labels(rng, shape, 3, first_id=2, id_gap=3)  # ids 2, 5, 8
    present = [i for i in np.unique(lab) if i]
    cen[cen == present[0]] = 0  # this object falls back to its mean coordinate
    labels.append(lab)
    centers.append(cen)
    instances = torch.tensor(np.stack(labels))
    centres = torch.tensor(np.stack(centers))
    # Coarse steps so that phi takes every value in [0, 1] on these small crops.
    step = (1 / 40, 1 / 50) if ndim == 2 else (2 / 40, 1 / 40, 1 / 50)
    return instances, centres, step, rng, shape


def assert_matches_reference(raw, instances, centers, step, fg_weight, rtol, atol, **kwargs):
    mine_raw = raw.clone().requires_grad_()
    ref_raw = raw.clone().requires_grad_()
    loss, parts = spatial_embedding_loss(mine_raw, instances, centers, step, fg_weight, **kwargs)
    ref, ref_parts = reference_loss(ref_raw, instances, centers, step, fg_weight)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=atol)
    for key in ("instance", "variance", "seed"):
        torch.testing.assert_close(parts[key], ref_parts[key], rtol=rtol, atol=atol)
    scale = ref_raw.grad.abs().max()
    torch.testing.assert_close(mine_raw.grad, ref_raw.grad, rtol=rtol, atol=atol * scale)
    return loss, ref_raw.grad


# ---------------------------------------------------------------------------------------------
# Tests


def test_lovasz_rows_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 200, dtype=torch.float64, requires_grad=True)
    labels = torch.rand(5, 200) < 0.3
    labels[3] = False  # a row without foreground
    labels[4] = True  # a row without background
    mine = lovasz_hinge_rows(logits, labels)
    ref = torch.stack([reference_lovasz_hinge(logits[i], labels[i]) for i in range(5)])
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    g_mine = torch.autograd.grad(mine.sum(), logits)[0]
    g_ref = torch.autograd.grad(ref.sum(), logits)[0]
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("phi_cutoff", [0.0, 1e-12])
def test_loss_matches_reference_float64(ndim, phi_cutoff, backend):
    instances, centers, step, rng, shape = synthetic_batch(ndim)
    for sigma_mean in (-0.1, 0.3):
        raw = make_raw(rng, 3, ndim, shape, torch.float64, offset_scale=0.05, sigma_mean=sigma_mean)
        _, grad = assert_matches_reference(
            raw, instances, centers, step, 10.0, rtol=1e-8, atol=1e-10, phi_cutoff=phi_cutoff, backend=backend
        )
        # The object terms contribute: offsets and sigmas have gradient.
        assert grad[:, : 2 * ndim].abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_loss_float32_close_to_float64_reference(ndim, backend):
    instances, centers, step, rng, shape = synthetic_batch(ndim, seed=1)
    raw64 = make_raw(rng, 3, ndim, shape, torch.float64, offset_scale=0.05, sigma_mean=0.2)
    raw32 = raw64.float().requires_grad_()
    loss32, _ = spatial_embedding_loss(raw32, instances, centers, step, 10.0, backend=backend)
    loss32.backward()
    raw64 = raw64.requires_grad_()
    ref, _ = reference_loss(raw64, instances, centers, step, 10.0)
    ref.backward()
    torch.testing.assert_close(loss32.double(), ref, rtol=1e-5, atol=1e-6)
    scale = raw64.grad.abs().max()
    torch.testing.assert_close(raw32.grad.double(), raw64.grad, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_used(backend):
    instances, centers, step, rng, shape = synthetic_batch(2, seed=2)
    raw = make_raw(rng, 3, 2, shape, torch.float64, offset_scale=0.05, sigma_mean=0.2)
    loss, parts = spatial_embedding_loss(raw, instances, centers, step, 3.0, w_inst=0.5, w_var=2.0, w_seed=4.0,
                                         backend=backend)
    ref, _ = reference_loss(raw, instances, centers, step, 3.0, w_inst=0.5, w_var=2.0, w_seed=4.0)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    expected = 0.5 * parts["instance"] + 2.0 * parts["variance"] + 4.0 * parts["seed"]
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_label_upper_bound_gives_same_result(backend):
    instances, centers, step, rng, shape = synthetic_batch(2, seed=3)
    raw = make_raw(rng, 3, 2, shape, torch.float64, offset_scale=0.05, sigma_mean=0.2)
    a, _ = spatial_embedding_loss(raw, instances, centers, step, 10.0, backend=backend)
    b, _ = spatial_embedding_loss(raw, instances, centers, step, 10.0, max_label=int(instances.max()) + 7,
                                  backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_centre_pixels_use_their_mean(backend):
    instances, centers, step, rng, shape = synthetic_batch(2, seed=4)
    ids = [int(i) for i in torch.unique(instances[0]) if i]
    where = torch.nonzero(instances[0] == ids[0])
    centers[0, where[0, 0], where[0, 1]] = ids[0]
    centers[0, where[-1, 0], where[-1, 1]] = ids[0]
    raw = make_raw(rng, 3, 2, shape, torch.float64, offset_scale=0.05, sigma_mean=0.2)
    assert_matches_reference(raw, instances, centers, step, 10.0, rtol=1e-8, atol=1e-10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_objects_keeps_graph_alive(backend):
    raw = torch.randn(2, 5, 16, 16, requires_grad=True)
    instances = torch.zeros(2, 16, 16, dtype=torch.long)
    loss, parts = spatial_embedding_loss(raw, instances, instances.clone(), grid_step(2), 10.0, backend=backend)
    loss.backward()
    assert raw.grad is not None
    assert torch.all(raw.grad[:, :4] == 0)
    assert raw.grad[:, 4].abs().sum() > 0  # the seed is pulled to 0 on background
    assert parts["instance"] == 0 and parts["variance"] == 0
    expected = (torch.sigmoid(raw[:, 4].detach()) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_bad_shapes_raise():
    raw = torch.zeros(1, 5, 8, 8)
    with pytest.raises(ValueError):
        spatial_embedding_loss(raw, torch.zeros(1, 8, 9, dtype=torch.long), torch.zeros(1, 8, 9, dtype=torch.long),
                               grid_step(2), 10.0)
    with pytest.raises(ValueError):
        spatial_embedding_loss(raw, torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long),
                               grid_step(3), 10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cutoff_prunes_and_stays_equal_on_realistic_outputs(backend):
    """Near the network's initial state (large bandwidth), pruning is exact to 1e-5."""
    rng = np.random.default_rng(5)
    shape = (64, 64)
    labels, centers = [], []
    for _ in range(2):
        lab, cen = random_labels(rng, shape, 12)
        labels.append(lab)
        centers.append(cen)
    instances, centres = torch.tensor(np.stack(labels)), torch.tensor(np.stack(centers))
    step = grid_step(2)
    raw = make_raw(rng, 2, 2, shape, torch.float32, offset_scale=0.004, sigma_mean=0.9)
    # The selection really prunes here (far fewer pairs than objects x pixels).
    objects = _objects(raw, instances, centres, step, None)
    n_pairs = _select_pairs(objects, _own_likelihood(objects), 1e-12).shape[0]
    assert n_pairs < 0.5 * objects.present.sum() * instances[0].numel()
    results = []
    for cutoff in (0.0, 1e-12, 1e-6):
        r = raw.clone().requires_grad_()
        loss, _ = spatial_embedding_loss(r, instances, centres, step, 10.0, phi_cutoff=cutoff, backend=backend)
        loss.backward()
        results.append((loss.detach(), r.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-5 * results[0][1].abs().max())


def many_objects_batch(ndim, n_objects, seed):
    """Two crops with more ids than the dense selection handles (the embedding-grid path)."""
    rng = np.random.default_rng(seed)
    shape = (48, 64) if ndim == 2 else (8, 24, 32)
    labels, centers = [], []
    for first in (1, 5):
        lab, cen = random_labels(rng, shape, n_objects, first_id=first, id_gap=2)
        labels.append(lab)
        centers.append(cen)
    step = (1 / 60, 1 / 70) if ndim == 2 else (2 / 60, 1 / 60, 1 / 70)
    return torch.tensor(np.stack(labels)), torch.tensor(np.stack(centers)), step, rng, shape


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("phi_cutoff", [0.0, 1e-12, 1e-3])
def test_grid_selection_equals_dense_selection(ndim, phi_cutoff):
    instances, centers, step, rng, shape = many_objects_batch(ndim, 24, seed=11)
    assert int(instances.max()) > _DENSE_MAX_IDS
    regimes = [(0.004, 0.9), (0.05, 0.3), (0.3, -0.2), (0.01, 1.5)]  # tight to very wide bandwidths
    n_pruned = 0
    for offset_scale, sigma_mean in regimes:
        raw = make_raw(rng, 2, ndim, shape, torch.float32, offset_scale=offset_scale, sigma_mean=sigma_mean)
        raw[0, :ndim, :3] = 4.0  # outliers: embeddings far outside the crop
        objects = _objects(raw, instances, centers, step, None)
        own = _own_likelihood(objects)
        grid = _select_pairs(objects, own, phi_cutoff)
        dense = _select_pairs_dense(objects, own, phi_cutoff)
        assert torch.equal(torch.sort(grid).values, dense)  # the same pairs, each once
        n_pruned += grid.numel() < 0.5 * objects.present.sum() * instances[0].numel()
    assert n_pruned >= 1  # some regime really prunes


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("phi_cutoff", [0.0, 1e-12])
def test_few_ids_selection_equals_dense_selection(ndim, phi_cutoff):
    instances, centers, step, rng, shape = synthetic_batch(ndim, seed=3)
    assert int(instances.max()) <= _DENSE_MAX_IDS
    raw = make_raw(rng, 3, ndim, shape, torch.float32, offset_scale=0.05, sigma_mean=0.3)
    objects = _objects(raw, instances, centers, step, None)
    own = _own_likelihood(objects)
    fast = _select_pairs(objects, own, phi_cutoff)
    dense = _select_pairs_dense(objects, own, phi_cutoff)
    assert dense.numel() > 0
    assert torch.equal(torch.sort(fast).values, dense)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_many_objects_match_reference_float64(ndim, backend):
    instances, centers, step, rng, shape = many_objects_batch(ndim, 20, seed=12)
    raw = make_raw(rng, 2, ndim, shape, torch.float64, offset_scale=0.02, sigma_mean=0.6)
    assert_matches_reference(raw, instances, centers, step, 10.0, rtol=1e-8, atol=1e-10, backend=backend)


def test_lovasz_rows_float32_match_reference():
    torch.manual_seed(1)
    logits = torch.randn(6, 300, dtype=torch.float64)
    logits[2, :50] = 1.0  # ties
    labels = torch.rand(6, 300) < 0.4
    labels[5] = False
    mine = lovasz_hinge_rows(logits.float(), labels)
    ref = torch.stack([reference_lovasz_hinge(logits[i], labels[i]) for i in range(6)])
    torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-6)


def test_gt_center_iou_matches_reference():
    instances, centers, step, rng, shape = synthetic_batch(2, seed=6)
    raw = make_raw(rng, 3, 2, shape, torch.float64, offset_scale=0.03, sigma_mean=0.3)
    iou = gt_center_iou(raw, instances, centers, step)
    ref = reference_iou(raw, instances, centers, step)
    assert iou.shape == ref.shape == (7,)
    torch.testing.assert_close(iou, ref)
    assert 0 < float(iou.mean()) < 1


def test_gt_center_iou_is_one_for_perfect_outputs():
    # Offsets that move every pixel onto its object's centre and a tight bandwidth: IoU 1.
    instances, centers, step, _, shape = synthetic_batch(2, seed=7)
    ndim = 2
    axes = [torch.arange(n, dtype=torch.float64) * h for n, h in zip(shape, step, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    raw = torch.zeros(3, 5, *shape, dtype=torch.float64)
    # s = exp(9): the 0.5-level radius (0.009 units) is below one pixel step (0.02 units), so
    # distinct centres never capture each other's pixels.
    raw[:, ndim : 2 * ndim] = 0.9
    for b in range(3):
        for i in [int(i) for i in torch.unique(instances[b]) if i]:
            mask = instances[b] == i
            cm = centers[b] == i
            c = grid[:, cm].mean(1) if cm.any() else grid[:, mask].mean(1)
            for d in range(ndim):
                raw[b, d][mask] = torch.atanh(c[d] - grid[d][mask])
        bg = instances[b] == 0
        raw[b, :ndim, bg] = 1.0  # push the background far away (tanh(1) = 0.76 units)
    iou = gt_center_iou(raw, instances, centers, step)
    torch.testing.assert_close(iou, torch.ones_like(iou))


# ---------------------------------------------------------------------------------------------
# Real crops


def first_pixel_centres(labels: np.ndarray) -> np.ndarray:
    """Centre image with each object's first pixel in C order."""
    centres = np.zeros_like(labels)
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    for i, f in zip(ids, first, strict=True):
        if i:
            centres.flat[f] = i
    return centres


def relabel(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[ids] = np.arange(len(ids))
    return lut[labels]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.skipif(not (DATA / "dsb2018_fluo/train/masks").is_dir(), reason="real data not available")
def test_loss_on_real_dsb_crops(backend):
    tifffile = pytest.importorskip("tifffile")
    files = sorted((DATA / "dsb2018_fluo/train/masks").glob("*.tif"))[:6]
    crops = []
    for f in files:
        mask = tifffile.imread(f)
        if min(mask.shape) < 96:
            continue
        crop = relabel(mask[:96, :96].astype(np.int64))
        if crop.max() >= 3:
            crops.append(crop)
        if len(crops) == 3:
            break
    assert crops, "no usable DSB crop"
    instances = torch.tensor(np.stack(crops))
    centres = torch.tensor(np.stack([first_pixel_centres(c) for c in crops]))
    rng = np.random.default_rng(8)
    raw = make_raw(rng, len(crops), 2, (96, 96), torch.float64, offset_scale=0.004, sigma_mean=0.9)
    assert_matches_reference(raw, instances, centres, grid_step(2), 10.0, rtol=1e-5, atol=1e-8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.skipif(not (DATA / "qcanet_embryo_3d/train/masks").is_dir(), reason="real data not available")
def test_loss_on_real_3d_crop(backend):
    tifffile = pytest.importorskip("tifffile")
    mask = tifffile.imread(next(iter(sorted((DATA / "qcanet_embryo_3d/train/masks").glob("*.tif")))))
    crop = relabel(mask[16:32, 30:78, 30:78].astype(np.int64))
    assert crop.max() >= 2
    instances = torch.tensor(crop[None])
    centres = torch.tensor(first_pixel_centres(crop)[None])
    rng = np.random.default_rng(9)
    raw = make_raw(rng, 1, 3, crop.shape, torch.float64, offset_scale=0.004, sigma_mean=0.8)
    assert_matches_reference(raw, instances, centres, grid_step(3, anisotropy=2.18), 35.0, rtol=1e-5, atol=1e-8,
                             backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_outputs_are_computed_in_float32(backend):
    instances, centers, step, rng, shape = synthetic_batch(2, seed=10)
    raw = make_raw(rng, 3, 2, shape, torch.float32, offset_scale=0.05, sigma_mean=0.2)
    half = raw.to(torch.bfloat16).requires_grad_()
    loss, _ = spatial_embedding_loss(half, instances.int(), centers.short(), step, 10.0, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
    ref, _ = spatial_embedding_loss(half.detach().float(), instances, centers, step, 10.0, backend=backend)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The compiled kernel and the dispatch

needs_numba = pytest.mark.skipif(not loss_kernel.AVAILABLE, reason="numba not available")


def test_auto_backend_picks_the_kernel_on_cpu_and_rejects_unknown_names():
    raw = torch.zeros(1, 5, 4, 4)
    assert _use_compiled(raw, "auto") == loss_kernel.AVAILABLE
    assert not _use_compiled(raw, "torch")
    assert not _use_compiled(raw.half(), "auto")  # half inputs are converted to float32 first
    with pytest.raises(ValueError, match="backend"):
        _use_compiled(raw, "numba")


@needs_numba
@pytest.mark.parametrize("ndim", [2, 3])
def test_compiled_equals_torch_on_realistic_float32_outputs(ndim):
    """Both formulations on crops with many objects (the grid search), several bandwidths."""
    instances, centers, step, rng, shape = many_objects_batch(ndim, 24, seed=13)
    for offset_scale, sigma_mean in [(0.004, 0.9), (0.05, 0.3), (0.01, 1.5)]:
        raw = make_raw(rng, 2, ndim, shape, torch.float32, offset_scale=offset_scale, sigma_mean=sigma_mean)
        raw[0, :ndim, :3] = 4.0  # embeddings far outside the crop
        out = {}
        for backend in ("torch", "compiled"):
            r = raw.clone().requires_grad_()
            loss, parts = spatial_embedding_loss(r, instances, centers, step, 10.0, backend=backend)
            loss.backward()
            out[backend] = (loss.detach(), parts, r.grad)
        (loss_t, parts_t, grad_t), (loss_c, parts_c, grad_c) = out["torch"], out["compiled"]
        assert grad_c.dtype == torch.float32
        torch.testing.assert_close(loss_c, loss_t, rtol=1e-5, atol=1e-7)
        for key in parts_t:
            torch.testing.assert_close(parts_c[key], parts_t[key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_c, grad_t, rtol=1e-3, atol=1e-4 * grad_t.abs().max())


@needs_numba
def test_compiled_gradient_follows_the_upstream_gradient_and_layout():
    instances, centers, step, rng, shape = synthetic_batch(2, seed=14)
    raw = make_raw(rng, 3, 2, shape, torch.float32, offset_scale=0.05, sigma_mean=0.3)
    r1 = raw.clone().requires_grad_()
    loss, _ = spatial_embedding_loss(r1, instances, centers, step, 10.0, backend="compiled")
    loss.backward()
    # A scaled loss (virtual batches, gradient scalers) scales the gradient; a channels-last input works.
    r2 = raw.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    loss2, _ = spatial_embedding_loss(r2, instances, centers, step, 10.0, backend="compiled")
    (2.5 * loss2).backward()
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(r2.grad, 2.5 * r1.grad, rtol=1e-6, atol=0)
    # Without gradient the value is the same.
    with torch.no_grad():
        loss3, _ = spatial_embedding_loss(raw, instances, centers, step, 10.0, backend="compiled")
    assert float(loss3) == float(loss.detach())


@needs_numba
def test_compiled_threads_give_identical_results():
    instances, centers, step, rng, shape = many_objects_batch(3, 20, seed=15)
    raw = make_raw(rng, 2, 3, shape, torch.float32, offset_scale=0.02, sigma_mean=0.6).numpy()
    flat = raw.reshape(2, 7, -1)
    args = (np.tanh(flat[:, :3]), 1 / (1 + np.exp(-flat[:, 6])), instances.reshape(2, -1).numpy(), centers.reshape(2, -1).numpy(), shape, step,
            int(instances.max()), 10.0, 1.0, 10.0, 1.0, 1e-12)
    one = loss_kernel.loss_and_gradient(flat, *args, n_threads=1)
    two = loss_kernel.loss_and_gradient(flat, *args, n_threads=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


@needs_numba
def test_compiled_rejects_ids_above_max_label():
    instances, centers, step, rng, shape = synthetic_batch(2, seed=16)
    raw = make_raw(rng, 3, 2, shape, torch.float32, offset_scale=0.05, sigma_mean=0.3)
    with pytest.raises(ValueError, match="max_label"):
        spatial_embedding_loss(raw, instances, centers, step, 10.0, max_label=2, backend="compiled")
    with pytest.raises(ValueError, match="negative"):
        spatial_embedding_loss(raw, -instances, centers, step, 10.0, backend="compiled")


@needs_numba
def test_compiled_backward_runs_once_with_a_clear_error_after():
    instances, centers, step, rng, shape = synthetic_batch(2, seed=17)
    raw = make_raw(rng, 3, 2, shape, torch.float32, offset_scale=0.05, sigma_mean=0.3).requires_grad_()
    loss, _ = spatial_embedding_loss(raw, instances, centers, step, 10.0, backend="compiled")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        loss.backward()


@needs_numba
def test_warm_up_in_background_compiles_the_kernel():
    thread = loss_kernel.warm_up_in_background()
    thread.join(timeout=120)
    assert not thread.is_alive()
    # The kernel and, compiled with it, everything it calls (both selection paths).
    assert any(str(sig[0]).startswith("array(float32") for sig in loss_kernel._image_loss.signatures)


@needs_numba
def test_compiled_many_objects_without_cutoff_match_reference_float64():
    """The grid search with unbounded boxes (phi_cutoff 0: every background pixel can count)."""
    instances, centers, step, rng, shape = many_objects_batch(2, 20, seed=18)
    raw = make_raw(rng, 2, 2, shape, torch.float64, offset_scale=0.02, sigma_mean=0.6)
    assert_matches_reference(raw, instances, centers, step, 10.0, rtol=1e-8, atol=1e-10, phi_cutoff=0.0,
                             backend="compiled")


@needs_numba
@pytest.mark.parametrize("channel", [0, 2, 4])  # an offset, a sigma, the seed
def test_compiled_non_finite_outputs_give_the_torch_result(channel):
    instances, centers, step, rng, shape = synthetic_batch(2, seed=19)
    raw = make_raw(rng, 3, 2, shape, torch.float32, offset_scale=0.05, sigma_mean=0.3)
    member = tuple(int(i) for i in torch.nonzero(instances[0])[0])
    for where in ((5, 5), member):  # (5, 5) is background
        for value in (float("nan"), float("inf"), 200.0):  # 200: large but finite, the kernel runs
            bad = raw.clone()
            bad[0, channel, where[0], where[1]] = value
            compiled, _ = spatial_embedding_loss(bad, instances, centers, step, 10.0, backend="compiled")
            reference, _ = spatial_embedding_loss(bad, instances, centers, step, 10.0, backend="torch")
            torch.testing.assert_close(compiled, reference, equal_nan=True, rtol=1e-5, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("shape", [(23, 37), (7, 16), (5, 11, 13), (9, 4, 30)])
def test_compiled_matches_reference_float64_on_odd_crop_shapes(shape):
    """The kernel's selection blocks (128 pixels) and embedding axes on crops whose sides are
    no multiple of anything: the same loss as the plain reference."""
    ndim = len(shape)
    rng = np.random.default_rng(sum(shape))
    labels, centers = zip(*(random_labels(rng, shape, n) for n in (3, 5)), strict=True)
    instances, centres = torch.tensor(np.stack(labels)), torch.tensor(np.stack(centers))
    step = tuple(1.0 / (s + 7) for s in shape)  # phi spans [0, 1] on these small crops
    for sigma_mean in (-0.1, 0.3):
        raw = make_raw(rng, 2, ndim, shape, torch.float64, offset_scale=0.05, sigma_mean=sigma_mean)
        _, grad = assert_matches_reference(raw, instances, centres, step, 10.0, rtol=1e-8, atol=1e-10,
                                           phi_cutoff=1e-12, backend="compiled")
        assert grad[:, :ndim].abs().max() > 1e-5  # the offsets get gradient
