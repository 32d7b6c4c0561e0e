"""Shared benchmark inputs, written once as ``.npy`` files and read by both implementations.

Run in the project's environment (numpy, tifffile, torch and ``embseg``). Each benchmark gets a
folder ``benchmarks/_work/inputs/<mode>/<bench>/`` with its arrays and a ``meta.json`` holding
every parameter both workers need (grid steps, thresholds, the reference's grid sizes).

Channel order: raw outputs are stored in OUR order (array-axis order ``(z,) y, x`` for offsets
and sigmas, then the seed logit). The reference worker reverses each of the two vector blocks
(it is x-first). Centre images are computed once, by ``embseg.centers.object_centers`` (exact
medoid, anisotropic in 3D), and given to both: ours as an id image, the reference as a boolean
image.

Synthetic raw outputs (loss and clustering): from real label images, "ideal" outputs with noise:
offsets point each object pixel to its object's medoid (plus Gaussian noise), sigmas give each
object a membership radius of a fraction of its equivalent radius, seediness falls from the
medoid (high) to the border (just above 0.5), background seed logits are strongly negative.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import tifffile

DATA = Path("/work/shared/data")
DSB = DATA / "dsb2018_fluo"
QCANET = DATA / "qcanet_embryo_3d" / "train"
USIIGACI = DATA / "usiigaci" / "train"

#: Bump when the inputs change, so that cached inputs are rebuilt.
VERSION = 10
ANISOTROPY_QCANET = 2.18
STEP_2D = 1.0 / 1023.0  # reference default grid 1024, pixel 1


def _normalize(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    lo, hi = np.percentile(image, [1.0, 99.8])
    return ((image - lo) / (hi - lo + 1e-20)).astype(np.float32)


def _relabel(labels: np.ndarray) -> np.ndarray:
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.int64)
    if ids[0] != 0:
        out += 1
    return out.astype(np.int32)


# ---------------------------------------------------------------------------------------- data
def dsb_dense(n_images: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The ``n_images`` DSB train images with the most objects (image, mask), largest first."""
    rows = list(csv.DictReader(open(DSB / "manifest.csv")))
    rows = [r for r in rows if r["split"] == "train"]
    rows.sort(key=lambda r: (-int(r["n_objects"]), r["file"]))
    out = []
    for r in rows[:n_images]:
        image = tifffile.imread(DSB / "train" / "images" / r["file"])
        mask = tifffile.imread(DSB / "train" / "masks" / r["file"])
        out.append((r["file"], image, mask))
    return out


def dsb_sorted(n_images: int, min_size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The first ``n_images`` DSB train images (sorted by name) at least ``min_size`` wide."""
    files = sorted((DSB / "train" / "masks").glob("*.tif"))
    out = []
    for f in files:
        mask = tifffile.imread(f)
        if min(mask.shape) < min_size:
            continue
        out.append((f.name, tifffile.imread(DSB / "train" / "images" / f.name), mask))
        if len(out) == n_images:
            break
    return out


def densest_window(mask: np.ndarray, size: int, stride: int = 32) -> tuple[int, int]:
    """Top-left corner of the ``size``² window holding the most distinct objects."""
    best, corner = -1, (0, 0)
    for y in range(0, mask.shape[0] - size + 1, stride):
        for x in range(0, mask.shape[1] - size + 1, stride):
            n = len(np.unique(mask[y : y + size, x : x + size]))
            if n > best:
                best, corner = n, (y, x)
    return corner


def object_crops(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, ...], n: int, rng: np.random.Generator,
    with_origin: bool = False,
) -> list[tuple]:
    """Crops of ``size`` centred on ``n`` random objects (clipped to the image), like the
    reference's one-crop-per-object preprocessing."""
    from scipy import ndimage

    ids = np.unique(mask)
    ids = ids[ids > 0]
    chosen = rng.choice(ids, size=min(n, len(ids)), replace=False)
    centroids = ndimage.center_of_mass(np.ones_like(mask), mask, chosen)
    out = []
    for c in centroids:
        origin = [int(np.clip(round(ci - s / 2), 0, dim - s)) for ci, s, dim in zip(c, size, mask.shape, strict=True)]
        box = tuple(slice(o, o + s) for o, s in zip(origin, size, strict=True))
        out.append((image[box], mask[box], origin) if with_origin else (image[box], mask[box]))
    return out


# ---------------------------------------------------------------------------------- centres etc
def center_ids(labels: np.ndarray, spacing=None) -> np.ndarray:
    """Id image: each object's id at its medoid pixel (our ``embseg.centers``)."""
    from embseg.centers import center_image, object_centers

    return center_image(labels, object_centers(labels, "medoid", spacing)).astype(np.int32)


def synthetic_raw(
    labels: np.ndarray,
    centers: np.ndarray,
    step: tuple[float, ...],
    rng: np.random.Generator,
    offset_noise_px: float,
    sigma_noise: float,
    radius_frac: float,
    min_radius_px: float = 3.0,
) -> np.ndarray:
    """Realistic raw outputs ``(2D+1, *S)`` (our channel order) for a label image.

    Offsets point to each object's centre pixel (``centers`` id image) plus noise; sigma gives a
    membership radius of ``radius_frac`` times the object's equivalent radius (at least
    ``min_radius_px`` pixels); seediness decreases linearly from 0.99 at the centre to 0.55 at
    the farthest pixel; background seeds are about sigmoid(-4).
    """
    ndim = labels.ndim
    step_a = np.asarray(step, dtype=np.float64)
    spacing = step_a / step_a[-1]  # physical pixel size in x units
    n_ids = int(labels.max()) + 1
    center_of = np.zeros((n_ids, ndim))
    cz = np.argwhere(centers > 0)
    center_of[centers[tuple(cz.T)]] = cz
    counts = np.bincount(labels.ravel(), minlength=n_ids).astype(np.float64)
    volume = counts * float(np.prod(spacing))
    if ndim == 2:
        eq_radius = np.sqrt(volume / math.pi)
    else:
        eq_radius = np.cbrt(3.0 * volume / (4.0 * math.pi))
    radius_px = np.maximum(radius_frac * eq_radius, min_radius_px)
    s = math.log(2.0) / (radius_px * step_a[-1]) ** 2
    sigma_of = np.log(s) / 10.0

    grid = np.indices(labels.shape, dtype=np.float64)
    fg = labels > 0
    lab = labels
    target = np.stack([center_of[lab, d] for d in range(ndim)])  # (D, *S) in pixels
    delta_px = np.where(fg[None], target - grid, 0.0)
    dist = np.sqrt(((delta_px * spacing.reshape((ndim,) + (1,) * ndim)) ** 2).sum(0))
    dmax = np.zeros(n_ids)
    np.maximum.at(dmax, lab.ravel(), dist.ravel())
    noise = rng.normal(0.0, offset_noise_px, size=delta_px.shape)
    delta = (delta_px + noise) * step_a.reshape((ndim,) + (1,) * ndim)
    offsets = np.arctanh(np.clip(delta, -0.999, 0.999))

    sigma_bg = float(np.median(sigma_of[1:])) if n_ids > 1 else 0.5
    sigma = np.where(fg, sigma_of[lab], sigma_bg)[None].repeat(ndim, 0)
    sigma = sigma + rng.normal(0.0, sigma_noise, size=sigma.shape)

    prob = 0.99 - 0.44 * dist / np.maximum(dmax[lab], 1.0)
    prob = np.clip(prob, 0.5001, 0.999)
    seed = np.where(fg, np.log(prob / (1 - prob)), -4.0) + rng.normal(0.0, 1e-3, size=labels.shape)
    raw = np.concatenate([offsets, sigma, seed[None]]).astype(np.float32)
    return raw


def tile_masks(masks: list[np.ndarray], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Fill ``shape`` with the masks (flipped at random), ids made unique across tiles."""
    out = np.zeros(shape, dtype=np.int64)
    tile = masks[0].shape
    grid = [math.ceil(s / t) for s, t in zip(shape, tile, strict=True)]
    offset = 0
    k = 0
    for index in np.ndindex(*grid):
        m = masks[k % len(masks)].astype(np.int64)
        k += 1
        for axis in range(m.ndim):
            if rng.random() < 0.5:
                m = np.flip(m, axis)
        box = tuple(slice(i * t, min((i + 1) * t, s)) for i, t, s in zip(index, tile, shape, strict=True))
        part = m[tuple(slice(0, b.stop - b.start) for b in box)]
        part = np.where(part > 0, part + offset, 0)
        offset = int(part.max()) if part.max() > 0 else offset
        out[box] = part
    return _relabel(out)


# ------------------------------------------------------------------------------------- writing
def _save(folder: Path, meta: dict, **arrays: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _grid3d(shape_zyx: tuple[int, int, int], anisotropy: float) -> dict:
    """Reference grid for a 3D volume (as its notebooks: Y = X = max extent rounded up to 8)
    and the matching grid step of ours."""
    gz = (int(shape_zyx[0]) + 7) // 8 * 8
    gxy = (max(shape_zyx[1:]) + 7) // 8 * 8
    pixel_z = (gz - 1) / (gxy - 1) * anisotropy
    return {
        "ref_grid": [gz, gxy, gxy],
        "ref_pixel": [pixel_z, 1.0, 1.0],
        "step": [anisotropy / (gxy - 1), 1.0 / (gxy - 1), 1.0 / (gxy - 1)],
        "anisotropy": anisotropy,
    }


def qcanet() -> tuple[np.ndarray, np.ndarray]:
    image = tifffile.imread(QCANET / "images" / "8_cell_stage.tif")
    mask = tifffile.imread(QCANET / "masks" / "8_cell_stage.tif")
    return _normalize(image), mask.astype(np.int32)


def build_loss_2d(folder: Path, quick: bool, rng: np.random.Generator) -> None:
    size, batch = (128, 2) if quick else (256, 4)
    images = dsb_dense(batch * 3)
    crops = []
    used = set()
    for name, _, mask in images:
        if min(mask.shape) < size or len(crops) == batch:
            continue
        y, x = densest_window(mask, size)
        crops.append(_relabel(mask[y : y + size, x : x + size]))
        used.add(name)
    instances = np.stack(crops)
    step = (STEP_2D, STEP_2D)
    centers = np.stack([center_ids(c) for c in crops])
    raw = np.stack([
        synthetic_raw(c, ctr, step, rng, offset_noise_px=2.0, sigma_noise=0.05, radius_frac=0.8)
        for c, ctr in zip(crops, centers, strict=True)
    ])
    n_obj = [int(c.max()) for c in crops]
    meta = {"ndim": 2, "step": list(step), "fg_weight": 10.0, "ref_grid": [1024, 1024],
            "ref_pixel": [1.0, 1.0], "objects_per_crop": n_obj,
            "desc": f"{batch}x{size}² DSB crops ({min(n_obj)}-{max(n_obj)} objects each)"}
    _save(folder, meta, raw=raw, instances=instances, centers=centers)


def _qcanet_crops(size: tuple[int, int, int], n: int, rng: np.random.Generator):
    image, mask = qcanet()
    crops = object_crops(image, mask, size, n, rng)
    return [(im, _relabel(m)) for im, m in crops]


def build_loss_3d(folder: Path, quick: bool, rng: np.random.Generator) -> None:
    size, batch = ((24, 64, 64), 1) if quick else ((32, 96, 96), 2)
    _, mask = qcanet()
    geo = _grid3d(mask.shape, ANISOTROPY_QCANET)
    spacing = (ANISOTROPY_QCANET, 1.0, 1.0)
    crops = [m for _, m in _qcanet_crops(size, batch, rng)]
    instances = np.stack(crops)
    centers = np.stack([center_ids(c, spacing) for c in crops])
    step = tuple(geo["step"])
    raw = np.stack([
        synthetic_raw(c, ctr, step, rng, offset_noise_px=2.0, sigma_noise=0.05, radius_frac=0.8)
        for c, ctr in zip(crops, centers, strict=True)
    ])
    fg_weight = float((mask == 0).sum() / (mask > 0).sum())
    n_obj = [int(c.max()) for c in crops]
    meta = {"ndim": 3, "fg_weight": fg_weight, "objects_per_crop": n_obj, **geo,
            "desc": f"{batch}x{'x'.join(map(str, size))} QCANet crops ({min(n_obj)}-{max(n_obj)} objects each)"}
    _save(folder, meta, raw=raw, instances=instances, centers=centers)


def build_cluster_2d(folder: Path, quick: bool, rng: np.random.Generator) -> None:
    size = 256 if quick else 1024
    tile = 128 if quick else 512
    masks = []
    for _, _, mask in dsb_dense(8):
        if min(mask.shape) >= tile:
            y, x = densest_window(mask, tile, stride=64)
            masks.append(mask[y : y + tile, x : x + tile])
    labels = tile_masks(masks[:4], (size, size), rng)
    step = (STEP_2D, STEP_2D)
    centers = center_ids(labels)
    raw = synthetic_raw(labels, centers, step, rng, offset_noise_px=0.7, sigma_noise=0.01, radius_frac=0.6)
    sizes = np.bincount(labels.ravel())[1:]
    min_size = 10
    meta = {"ndim": 2, "step": list(step), "ref_grid": [1024, 1024], "ref_pixel": [1.0, 1.0],
            "seed_thresh": 0.9, "fg_thresh": 0.5, "ref_min_object_size": min_size,
            "min_size": min_size + 1, "n_objects": int(labels.max()),
            "smallest_object": int(sizes.min()),
            "desc": f"{size}² tiled DSB masks, {int(labels.max())} objects"}
    _save(folder, meta, raw=raw, labels=labels)


def pack_objects(
    mask: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, gap: int = 2, occupancy: float = 1.0
) -> np.ndarray:
    """A label volume of ``shape``: the objects of ``mask`` (cut to their bounding boxes, flipped
    at random) placed in a random ``occupancy`` fraction of the cells of a regular grid, at least
    ``gap`` voxels apart."""
    from scipy import ndimage

    boxes = [b for b in ndimage.find_objects(mask) if b is not None]
    objects = [(mask[b] == i + 1) for i, b in enumerate(boxes)]
    cell = [max(o.shape[d] for o in objects) + gap for d in range(mask.ndim)]
    grid = [s // c for s, c in zip(shape, cell, strict=True)]
    out = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for index in np.ndindex(*grid):
        if rng.random() >= occupancy:
            continue
        obj = objects[rng.integers(len(objects))]
        for axis in range(obj.ndim):
            if rng.random() < 0.5:
                obj = np.flip(obj, axis)
        corner = [i * c + int(rng.integers(0, c - o - gap + 1)) for i, c, o in zip(index, cell, obj.shape, strict=True)]
        box = tuple(slice(c, c + o) for c, o in zip(corner, obj.shape, strict=True))
        out[box][obj] = next_id
        next_id += 1
    return out


def build_cluster_3d(folder: Path, quick: bool, rng: np.random.Generator) -> None:
    shape = (32, 128, 128) if quick else (64, 256, 256)
    _, mask = qcanet()
    # a third of the densest packing: the reference needs minutes for the dense one
    labels = pack_objects(mask, shape, rng, occupancy=0.33)
    geo = _grid3d(shape, ANISOTROPY_QCANET)
    step = tuple(geo["step"])
    centers = center_ids(labels, (ANISOTROPY_QCANET, 1.0, 1.0))
    raw = synthetic_raw(labels, centers, step, rng, offset_noise_px=0.7, sigma_noise=0.01, radius_frac=0.6)
    min_size = 10
    meta = {"ndim": 3, **geo, "seed_thresh": 0.9, "fg_thresh": 0.5,
            "ref_min_object_size": min_size, "min_size": min_size + 1,
            "n_objects": int(labels.max()),
            "desc": f"{'x'.join(map(str, shape))}, {int(labels.max())} QCANet nuclei packed "
                    f"({100 * (labels > 0).mean():.0f}% foreground)"}
    _save(folder, meta, raw=raw, labels=labels)


def _save_net(folder: Path, ndim: int, seed: int = 0) -> None:
    """Random-init network of ours (seeded), its state dict, and a check input/output."""
    import torch

    from embseg.net import BranchedERFNet

    torch.manual_seed(seed)
    net = BranchedERFNet(ndim, 1)  # as at the start of training (offset/sigma output init)
    torch.save(net.state_dict(), folder / "net.pt")
    # the equality check uses non-trivial output layers, so that it covers every output channel
    with torch.no_grad():
        for p in net.decoders[0].output_conv.parameters():
            p.normal_(0.0, 0.05)
    net.eval()
    shape = (1, 1, 64, 64) if ndim == 2 else (1, 1, 16, 32, 32)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(shape, generator=gen)
    with torch.no_grad():
        y = net(x)
    torch.save(net.state_dict(), folder / "net_check.pt")
    np.save(folder / "net_check_in.npy", x.numpy())
    np.save(folder / "net_check_out.npy", y.numpy())


def build_train_step(folder: Path, quick: bool, rng: np.random.Generator, ndim: int, big: bool = False) -> None:
    if ndim == 2:
        if big:
            # the reference trained DSB on 16 x 256²; 4 crops keep the CPU run short (cost is per crop)
            size, batch = ((256, 256), 2) if quick else ((256, 256), 4)
        else:
            size, batch = ((96, 96), 4) if quick else ((96, 96), 16)
        pool = dsb_dense(6)
        crops = []
        per = math.ceil(batch / len(pool))
        for _, image, mask in pool:
            if min(mask.shape) >= size[0]:
                crops += object_crops(_normalize(image), mask, size, per, rng)
        crops = [(im, _relabel(m)) for im, m in crops[:batch]]
        meta = {"ndim": 2, "step": [STEP_2D, STEP_2D], "fg_weight": 10.0, "ref_grid": [1024, 1024],
                "ref_pixel": [1.0, 1.0]}
        spacing = None
        what = "DSB"
    else:
        size, batch = ((16, 48, 48), 1) if quick else ((32, 96, 96), 2)
        _, mask = qcanet()
        crops = _qcanet_crops(size, batch, rng)
        meta = {"ndim": 3, "fg_weight": float((mask == 0).sum() / (mask > 0).sum()),
                **_grid3d(mask.shape, ANISOTROPY_QCANET)}
        spacing = (ANISOTROPY_QCANET, 1.0, 1.0)
        what = "QCANet"
    assert len(crops) == batch, (len(crops), batch)
    images = np.stack([im for im, _ in crops])[:, None].astype(np.float32)
    instances = np.stack([m for _, m in crops])
    centers = np.stack([center_ids(m, spacing) for m in instances])
    n_obj = [int(m.max()) for m in instances]
    meta["desc"] = f"{batch}x{'x'.join(map(str, size))} {what} crops ({min(n_obj)}-{max(n_obj)} objects)"
    meta["lr"] = 5e-4
    meta["weight_decay"] = 1e-4
    _save(folder, meta, images=images, instances=instances, centers=centers)
    _save_net(folder, ndim)


def build_predict(folder: Path, quick: bool, rng: np.random.Generator, ndim: int) -> None:
    if ndim == 2:
        image = tifffile.imread(USIIGACI / "images" / "set1.tif")
        if quick:
            image = image[:256, :256]
        image = _normalize(image)
        shape = image.shape
        grid = max((s + 7) // 8 * 8 for s in shape)
        grid = max(grid, 1024)
        meta = {"ndim": 2, "step": [1.0 / (grid - 1)] * 2, "ref_grid": [grid, grid], "ref_pixel": [1.0, 1.0],
                "desc": f"Usiigaci set1 {shape[0]}x{shape[1]}"}
    else:
        image, _ = qcanet()
        if quick:
            image = image[:16, :48, :48]
        shape = image.shape
        meta = {"ndim": 3, **_grid3d(shape, ANISOTROPY_QCANET),
                "desc": f"QCANet {'x'.join(map(str, shape))}"}
    meta.update({"seed_thresh": 0.9, "fg_thresh": 0.5, "ref_min_object_size": 10, "min_size": 11})
    _save(folder, meta, image=image[None].astype(np.float32))
    _save_net(folder, ndim)


def _save_trained_net(folder: Path, net) -> None:
    """A trained network of ours (float32 state dict) and a check input/output with it."""
    import torch

    net = net.float().eval()
    torch.save(net.state_dict(), folder / "net.pt")
    torch.save(net.state_dict(), folder / "net_check.pt")
    shape = (1, 1, 64, 64) if net.ndim == 2 else (1, 1, 16, 32, 32)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
    np.save(folder / "net_check_in.npy", x.numpy())
    np.save(folder / "net_check_out.npy", y.numpy())


def dsb_mosaic(size: int = 1024, n: int = 4) -> tuple[np.ndarray, list[str]]:
    """A ``size``² mosaic of the ``n`` densest DSB *test* images of 520x696 (2x2, each normalised
    on its own as ``Model.prepare`` would), cropped to ``size``²."""
    rows = [r for r in csv.DictReader(open(DSB / "manifest.csv")) if r["split"] == "test" and r["shape"] == "520x696"]
    rows.sort(key=lambda r: (-int(r["n_objects"]), r["file"]))
    rows = rows[:n]
    tiles = [_normalize(tifffile.imread(DSB / "test" / "images" / r["file"])) for r in rows]
    grid = [np.concatenate(tiles[i : i + 2], axis=1) for i in range(0, len(tiles), 2)]
    mosaic = np.concatenate(grid, axis=0)[:size, :size]
    return np.ascontiguousarray(mosaic, dtype=np.float32), [r["file"] for r in rows]


def build_predict_trained(folder: Path, quick: bool, rng: np.random.Generator, ndim: int) -> None:
    """End-to-end prediction with a trained network: 2D the shipped ``nuclei-2d`` model on a
    1024² mosaic of DSB test images; 3D the benchmark's QCANet model (``bench_model.py``)."""
    from embseg.model import load_model

    if ndim == 2:
        model = load_model("nuclei-2d", device="cpu")
        image, files = dsb_mosaic(256 if quick else 1024)
        grid = max(1024, (max(image.shape) + 7) // 8 * 8)
        meta = {"ndim": 2, "step": [1.0 / (grid - 1)] * 2, "ref_grid": [grid, grid], "ref_pixel": [1.0, 1.0],
                "desc": f"shipped nuclei-2d model, {image.shape[0]}x{image.shape[1]} mosaic of 4 DSB test images",
                "sources": files}
    else:
        from bench_model import qcanet_model_dir

        model = load_model(qcanet_model_dir(), device="cpu")
        image, _ = qcanet()
        # the embryo 2x2 side by side in y and x (51x240x244, about 36 nuclei): a volume of the
        # cluster_3d benchmark's size; the embryo alone (0.75 M voxels, 8 nuclei) is smaller than
        # a single tile of real 3D data
        image = np.ascontiguousarray(np.tile(image, (1, 2, 2)))
        if quick:
            image = image[:16, :48, :48]
        shape = image.shape
        # the model's grid step; the reference's grid is the volume rounded up to 8 per axis,
        # with the pixel size that gives the same step (step = pixel / (grid - 1))
        grid = [(int(n) + 7) // 8 * 8 for n in shape]
        step = [float(s) for s in model.config.grid_step]
        meta = {"ndim": 3, "step": step, "ref_grid": grid,
                "ref_pixel": [s * (g - 1) for s, g in zip(step, grid, strict=True)],
                "anisotropy": ANISOTROPY_QCANET,
                "desc": f"benchmark QCANet model (bench_model.py), QCANet embryo tiled 1x2x2: "
                        f"{'x'.join(map(str, shape))}"}
    cfg = model.config
    if any(abs(a - b) > 1e-9 for a, b in zip(cfg.grid_step, meta["step"], strict=True)):
        raise RuntimeError(f"model grid step {cfg.grid_step} is not the benchmark's {meta['step']}")
    meta.update({"seed_thresh": cfg.seed_thresh, "fg_thresh": cfg.fg_thresh, "min_size": cfg.min_size,
                 "ref_min_object_size": cfg.min_size - 1, "trained": True})
    _save(folder, meta, image=image[None].astype(np.float32))
    _save_trained_net(folder, model.net)


def build_medoid(folder: Path, quick: bool, rng: np.random.Generator) -> None:
    n_images, size = (3, 96) if quick else (10, 96)
    crops, ids_full, masks, image_index, origins = [], [], {}, [], []
    for k, (_, _, mask) in enumerate(dsb_sorted(n_images, size)):
        ids = np.unique(mask)
        ids = ids[ids > 0]
        masks[f"mask_{k}"] = mask.astype(np.int32)
        for _, m, origin in object_crops(mask, mask, (size, size), len(ids), rng, with_origin=True):
            crops.append(m.astype(np.int32))
            ids_full.append(ids.astype(np.int32))
            image_index.append(k)
            origins.append(origin)
    offsets = np.cumsum([0] + [len(i) for i in ids_full])
    meta = {"ndim": 2, "n_crops": len(crops), "n_images": n_images,
            "desc": f"{len(crops)} object-centred {size}² crops of {n_images} DSB images"}
    _save(folder, meta, crops=np.stack(crops), ids_full=np.concatenate(ids_full), ids_offsets=offsets,
          image_index=np.array(image_index, np.int64), origins=np.array(origins, np.int64), **masks)


BUILDERS = {
    "loss_2d": build_loss_2d,
    "loss_3d": build_loss_3d,
    "cluster_2d": build_cluster_2d,
    "cluster_3d": build_cluster_3d,
    "train_step_2d": lambda f, q, r: build_train_step(f, q, r, 2),
    "train_step_2d_256": lambda f, q, r: build_train_step(f, q, r, 2, big=True),
    "train_step_3d": lambda f, q, r: build_train_step(f, q, r, 3),
    "predict_2d": lambda f, q, r: build_predict(f, q, r, 2),
    "predict_3d": lambda f, q, r: build_predict(f, q, r, 3),
    "predict_2d_trained": lambda f, q, r: build_predict_trained(f, q, r, 2),
    "predict_3d_trained": lambda f, q, r: build_predict_trained(f, q, r, 3),
    "medoid": build_medoid,
}


def build(root: Path, name: str, quick: bool) -> Path:
    """Build (or reuse) the inputs of benchmark ``name``; returns its folder."""
    folder = root / ("quick" if quick else "full") / name
    stamp = folder / ".version"
    if stamp.is_file() and stamp.read_text() == str(VERSION):
        return folder
    rng = np.random.default_rng(sum(map(ord, name)))
    BUILDERS[name](folder, quick, rng)
    stamp.write_text(str(VERSION))
    return folder
