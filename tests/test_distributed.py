"""Block-wise prediction on dask: equal to in-memory prediction, seamless at block borders, resumable.

The network is an *oracle*: the image holds the ideal raw outputs of a known label image (every
object pixel's offset points at the object's centre, a tight bandwidth, a seed peak at the
centre), shifted by ``SHIFT`` pixels, and the oracle undoes the normalisation and the shift.
Its output at a pixel depends on the input ``SHIFT`` pixels away, so it has a real receptive
field: blocks need a context halo of at least ``SHIFT`` to see what a whole-image pass sees.
Clustering its outputs gives back the known labels, so the comparisons are meaningful.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import dataset
from embseg.cluster import cluster
from embseg.config import ModelConfig
from embseg.distributed import (
    Block,
    BlockRunInterrupted,
    owned_objects,
    plan_blocks,
    predict_blocks,
    volume_stats,
    work_folder,
)
from embseg.errors import UserError
from embseg.model import Model
from embseg.normalize import percentile_stats
from embseg.zarr_io import open_zarr_image, read_zarr_labels, write_image_zarr

distributed = pytest.importorskip("distributed")
pytest.importorskip("zarr")

H = 1.0 / 1023.0
SHIFT = 4


# ------------------------------------------------------------------------------ oracle


class OracleNet(nn.Module):
    """Output at ``p`` = de-normalised input at ``p + shift`` (every axis); edge replicated."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, ndim: int, shift: int = SHIFT):
        super().__init__()
        view = (1, -1) + (1,) * ndim
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32).view(view))
        self.register_buffer("span", torch.tensor(hi - lo, dtype=torch.float32).view(view))
        self.ndim = ndim
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.span + self.lo
        if self.shift:
            y = y[(slice(None), slice(None), *[slice(self.shift, None)] * self.ndim)]
            y = nn.functional.pad(y, (0, self.shift) * self.ndim, mode="replicate")
        return y


def blob_labels(shape, n, radius, seed, margin=SHIFT + 10):
    """Up to ``n`` non-overlapping balls (radius in ``radius``), at least ``margin`` from the far
    borders; touching allowed."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    grid = np.indices(shape)
    next_id = 1
    for _ in range(n * 4):
        r = rng.uniform(*radius)
        c = [rng.uniform(r, s - margin - r) for s in shape]
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= r * r
        if ball.sum() < 5 or labels[ball].any():
            continue
        labels[ball] = next_id
        next_id += 1
        if next_id > n:
            break
    return labels


def ideal_raw(labels, step, seed=0, radius_px=2.0):
    """Ideal raw outputs ``(2D+1, *S)`` of a label image; background is random noise (not
    foreground) so that every channel has spread-out percentiles."""
    from embseg.centers import object_centers

    ndim = labels.ndim
    rng = np.random.default_rng(seed)
    raw = np.empty((2 * ndim + 1, *labels.shape), dtype=np.float32)
    raw[:ndim] = rng.uniform(-0.3, 0.3, (ndim, *labels.shape))
    raw[ndim : 2 * ndim] = rng.uniform(0.0, 1.0, (ndim, *labels.shape))
    raw[2 * ndim] = rng.uniform(-12, -6, labels.shape)
    centers = object_centers(labels, "approximate_medoid")
    table = np.zeros((int(labels.max()) + 1, ndim))
    peak = np.zeros(int(labels.max()) + 1)
    for k, c in centers.items():
        table[k] = c
        peak[k] = 6.0 + rng.uniform(0, 2)
    fg = np.nonzero(labels)
    ids = labels[fg]
    pos = np.stack(fg, axis=1).astype(np.float64)
    d = table[ids] - pos
    step = np.asarray(step)
    for a in range(ndim):
        raw[(a, *fg)] = np.arctanh(d[:, a] * step[a])
        raw[(ndim + a, *fg)] = math.log(math.log(2.0) / (radius_px * step[a]) ** 2) / 10.0
    dist = np.sqrt((d**2).sum(axis=1))
    raw[(2 * ndim, *fg)] = np.where(dist == 0, peak[ids], np.maximum(3.5 - 0.02 * dist, 0.5))
    return raw


def shifted_input(raw, shift=SHIFT, seed=1):
    """Image whose oracle output is ``raw``: ``image[q] = raw[q - shift]``."""
    ndim = raw.ndim - 1
    image = ideal_raw(np.zeros(raw.shape[1:], np.uint16), [H] * ndim, seed=seed)
    if shift:
        image[(slice(None), *[slice(shift, None)] * ndim)] = raw[(slice(None), *[slice(None, -shift)] * ndim)]
    else:
        image[...] = raw
    return image


def oracle_model(image, ndim, step, min_size=5, shift=SHIFT):
    lo, hi = percentile_stats(image, 1.0, 99.8)
    config = ModelConfig(ndim=ndim, in_channels=image.shape[0], grid_step=list(step), min_size=min_size, halo=8)
    return Model(config, OracleNet(lo, hi, ndim, shift))


def same_partition(a, b):
    """Equal up to a permutation of ids (0 stays 0)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def crossing_objects(labels, blocks):
    """Number of objects whose pixels lie in more than one block core."""
    owner = np.zeros(labels.shape, dtype=np.int64)
    for b in blocks:
        owner[b.core] = b.index
    ids = labels[labels > 0]
    pairs = np.unique(np.stack([ids, owner[labels > 0]]), axis=1)
    _, counts = np.unique(pairs[0], return_counts=True)
    return int((counts > 1).sum())


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster_ = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                            dashboard_address=None)
    with cluster_, distributed.Client(cluster_) as c:
        yield c


@pytest.fixture(scope="module")
def volume_3d(tmp_path_factory):
    shape = (40, 88, 88)
    step = (H, H, H)
    labels = blob_labels(shape, 70, (2.5, 5.5), seed=3)
    image = shifted_input(ideal_raw(labels, step))
    path = tmp_path_factory.mktemp("vol3d") / "blobs.ome.zarr"
    write_image_zarr(path, image, "CZYX", chunks=(16, 32, 32), voxel_size=(2.0, 0.5, 0.5), unit="micrometer")
    return labels, image, path, step


@pytest.fixture(scope="module")
def image_2d(tmp_path_factory):
    shape = (150, 170)
    step = (H, H)
    labels = blob_labels(shape, 60, (3, 8), seed=5)
    image = shifted_input(ideal_raw(labels, step))
    path = tmp_path_factory.mktemp("img2d") / "blobs2d.zarr"
    write_image_zarr(path, image, "CYX", chunks=(64, 64))
    return labels, image, path, step


# ------------------------------------------------------------------------------ pieces


def test_plan_blocks_partition_and_halos():
    shape = (37, 100, 61)
    blocks = plan_blocks(shape, (16, 40, 30), (5, 9, 0), (3, 8, 8))
    cover = np.zeros(shape, dtype=np.int64)
    for b in blocks:
        cover[b.core] += 1
        for d, n in enumerate(shape):
            core, clu, read = b.core[d], b.cluster[d], b.read[d]
            assert core.start % 8 == 0
            halo, ctx = (8, 16, 0)[d], 8
            assert clu.start == max(core.start - halo, 0) and clu.stop == min(core.stop + halo, n)
            before, after = b.pad[d]
            # context around the cluster region; reflection past the image by the context only
            assert read.start - before == clu.start - ctx and read.stop + after == clu.stop + ctx
            assert read.start == max(clu.start - ctx, 0) and read.stop == min(clu.stop + ctx, n)
        padded = [r.stop - r.start + p0 + p1 for r, (p0, p1) in zip(b.read, b.pad, strict=True)]
        inner = b.cluster_in_padded
        assert all(0 <= s.start <= s.stop <= p for s, p in zip(inner, padded, strict=True))
    assert cover.min() == cover.max() == 1
    assert len(blocks) == 3 * 3 * 2


def test_volume_stats_equal_in_memory_subsample(volume_3d):
    _, image, path, _ = volume_3d
    source = open_zarr_image(path)
    for max_samples in (None, 5000, 777):
        lo, hi = volume_stats(source, 1.0, 99.8, max_samples)
        ref = percentile_stats(image, 1.0, 99.8, max_samples=max_samples or 4_000_000)
        np.testing.assert_array_equal(lo, ref[0])
        np.testing.assert_array_equal(hi, ref[1])


def test_owned_objects_by_seed_position():
    # a 1 x 24 strip, the block's core is [8, 16), its cluster region all of it
    block = Block(1, (slice(0, 1), slice(8, 16)), (slice(0, 1), slice(0, 24)),
                  (slice(0, 1), slice(0, 24)), ((0, 0), (0, 0)))
    labels = np.zeros((1, 24), dtype=np.uint32)
    labels[0, 2:9] = 1  # seed at 5: in the halo, dropped although it reaches into the core
    labels[0, 10:20] = 2  # seed at 12: owned, whole although it leaves the core
    labels[0, 20:24] = 3  # seed at 15: owned, reaches the image border (not cut)
    seeds = np.array([5, 12, 15])
    seediness = np.linspace(0, 1, 24, dtype=np.float32).reshape(1, 24)
    objects = owned_objects(labels, seeds, seediness, block, (1, 24))
    assert objects.seed_position.tolist() == [[0, 12], [0, 15]]
    assert objects.offset.tolist() == [0, 10]
    assert objects.labels.tolist() == [[1] * 10 + [2] * 4]
    assert objects.seed_value.tolist() == [seediness[0, 12], seediness[0, 15]]
    assert objects.cut.tolist() == [False, False]
    inner = Block(1, block.core, (slice(0, 1), slice(4, 20)), block.read, block.pad)
    cut = owned_objects(labels[:, 4:20], seeds - 4, seediness[:, 4:20], inner, (1, 24))
    # object 3 has no pixel left in this region: dropped; object 2 touches the inner border at 19
    assert cut.seed_position.tolist() == [[0, 12]] and cut.cut.tolist() == [True]


def test_cluster_return_seeds_points_at_growing_pixel(image_2d):
    _, image, _, step = image_2d
    model = oracle_model(image, 2, step)
    raw = model.predict_raw(image, axes="CYX")
    plain = cluster(raw, step, min_size=5)
    with_seeds, seeds = cluster(raw, step, min_size=5, return_seeds=True)
    np.testing.assert_array_equal(plain, with_seeds)
    assert seeds.size == plain.max()
    # every seed is the centre pixel of its object (the unique seediness peak)
    peaks = np.unravel_index(seeds, plain.shape)
    np.testing.assert_array_equal(with_seeds[peaks], np.arange(1, seeds.size + 1))


# ------------------------------------------------------------------------------ end to end


def test_blockwise_equals_in_memory_3d_blocks_cut_many_objects(volume_3d, client, tmp_path):
    labels, image, path, step = volume_3d
    model = oracle_model(image, 3, step)
    expected = model.predict(image, axes="CZYX")
    assert same_partition(expected, labels)  # the oracle is right, so the test means something
    blocks = plan_blocks(labels.shape, (16, 32, 32), 8, 8)
    assert crossing_objects(labels, blocks) >= 15

    out = tmp_path / "blobs.zarr"
    report = predict_blocks(model, path, out, block_shape=(16, 32, 32), object_halo=8, context=SHIFT,
                            scheduler=client, progress=False)
    got = read_zarr_labels(out)
    assert report.n_blocks == len(blocks) == 27 and report.n_computed == 27 and report.n_cut == 0
    assert got.dtype == np.uint32 and report.n_objects == expected.max()
    np.testing.assert_array_equal(got, expected)  # ids included: the merge follows the seed order

    meta = open_zarr_image(out)
    assert meta.axes == "ZYX" and meta.voxel_size == (2.0, 0.5, 0.5) and meta.unit == "micrometer"
    import zarr

    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["image-label"] == {"version": "0.4"} and attrs["embseg"]["complete"] is True
    assert not work_folder(out).exists()


def test_blockwise_2d_equals_in_memory_and_needs_its_halos(image_2d, client, tmp_path):
    labels, image, path, step = image_2d
    model = oracle_model(image, 2, step)
    expected = model.predict(image, axes="CYX")
    assert same_partition(expected, labels)
    kw = dict(block_shape=40, scheduler=client, progress=False)
    predict_blocks(model, path, tmp_path / "ok.zarr", object_halo=8, context=SHIFT, **kw)
    np.testing.assert_array_equal(read_zarr_labels(tmp_path / "ok.zarr"), expected)

    # too little network context: outputs near the read border are wrong, objects are lost
    predict_blocks(model, path, tmp_path / "noctx.zarr", object_halo=8, context=0, **kw)
    assert not np.array_equal(read_zarr_labels(tmp_path / "noctx.zarr"), expected)

    # no object halo: objects crossing a block border are cut, and the run says so
    with pytest.warns(UserWarning, match="may be cut"):
        report = predict_blocks(model, path, tmp_path / "nohalo.zarr", object_halo=0, context=SHIFT, **kw)
    assert report.n_cut > 0
    assert not same_partition(read_zarr_labels(tmp_path / "nohalo.zarr"), expected)


def test_killed_run_resumes_to_the_same_output(image_2d, client, tmp_path):
    _, image, path, step = image_2d
    model = oracle_model(image, 2, step)
    out = tmp_path / "run.zarr"
    kw = dict(block_shape=48, object_halo=8, context=SHIFT, scheduler=client, progress=False)
    with pytest.raises(BlockRunInterrupted):
        predict_blocks(model, path, out, _stop_after=5, **kw)
    finished = sorted(p.name for p in (work_folder(out) / "blocks").glob("*.npz"))
    assert len(finished) == 5 and not out.exists()
    with pytest.raises(UserError, match="resume"):
        predict_blocks(model, path, out, **kw)
    with pytest.raises(UserError, match="other settings"):
        predict_blocks(model, path, out, resume=True, **{**kw, "object_halo": 16})
    report = predict_blocks(model, path, out, resume=True, **kw)
    assert (report.n_resumed, report.n_computed) == (5, report.n_blocks - 5)
    np.testing.assert_array_equal(read_zarr_labels(out), model.predict(image, axes="CYX"))
    with pytest.raises(UserError, match="already exists"):
        predict_blocks(model, path, out, **kw)


def test_cells3d_nuclei_oracle_blockwise_equals_in_memory(client, tmp_path):
    import tifffile

    folder = dataset("cells3d_nuclei_3d") / "test" / "masks"
    masks = tifffile.imread(folder / "cells3d_nuclei.tif")[:, ::2, ::2]
    step = (0.5 * H, H, H)  # z pixels are half as long as the down-sampled y/x pixels
    image = ideal_raw(masks, step, seed=7)
    model = oracle_model(image, 3, step, min_size=50, shift=0)
    expected = model.predict(image, axes="CZYX")
    assert same_partition(expected, masks)  # touching nuclei, each labelled whole
    blocks = plan_blocks(masks.shape, (32, 48, 48), 24, 0)
    assert crossing_objects(masks, blocks) >= 10
    out = tmp_path / "cells3d.zarr"
    report = predict_blocks(model, image, out, block_shape=(32, 48, 48), object_halo=(24, 24, 24), context=0,
                            scheduler=client, progress=False)
    assert report.n_cut == 0 and report.n_objects == masks.max()
    np.testing.assert_array_equal(read_zarr_labels(out), expected)


def test_cli_predict_zarr_on_a_scheduler_address(client, tmp_path, capsys):
    from embseg.cli import main
    from embseg.model import build_network, load_model

    torch.manual_seed(0)
    config = ModelConfig(ndim=2, min_size=3, crop_size=[32, 32])
    Model(config, build_network(config)).save(tmp_path / "model")
    rng = np.random.default_rng(0)
    image = write_image_zarr(tmp_path / "img.ome.zarr", rng.random((64, 80)).astype(np.float32), "YX")
    args = [str(image), "-m", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--block-shape", "32",
            "--object-halo", "8", "--context", "16", "--dask-scheduler", client.scheduler.address, "--quiet"]
    assert main(["predict", *args]) == 0
    got = read_zarr_labels(tmp_path / "out" / "img.zarr")
    api = predict_blocks(load_model(tmp_path / "model"), image, tmp_path / "api.zarr", block_shape=32,
                         object_halo=8, context=16, scheduler=client, progress=False)
    np.testing.assert_array_equal(got, read_zarr_labels(api.output))
    assert main(["predict", *args]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["predict", *args, "--resume"]) == 0
    assert main(["predict", *args, "--into-image", "embseg"]) == 0
    np.testing.assert_array_equal(read_zarr_labels(image / "labels" / "embseg"), got)
    assert main(["predict", *args[:-1], "--block-shape", "0"]) == 2


def test_cores_reached_equals_brute_force():
    from embseg.distributed import _cores_reached

    blocks = plan_blocks((37, 100, 61), (16, 40, 24), 8, 8)
    starts = [np.unique([b.core[d].start for b in blocks]) for d in range(3)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        lo = rng.integers(0, [37, 100, 61])
        size = rng.integers(1, [30, 60, 40])
        size = np.minimum(size, np.array([37, 100, 61]) - lo)
        brute = [b.index for b in blocks
                 if all(c.start < a + n and a < c.stop for c, a, n in zip(b.core, lo, size, strict=True))]
        assert _cores_reached(starts, lo, size) == brute
    assert _cores_reached(starts, (0, 0, 0), (0, 5, 5)) == []
