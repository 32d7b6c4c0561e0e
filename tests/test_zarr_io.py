"""Zarr / OME-Zarr: lazy reading with axes and voxel size, label images laid out per OME-NGFF 0.4."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embseg.errors import UserError
from embseg.zarr_io import (
    block_aligned_chunks,
    create_label_image,
    is_zarr,
    label_group_in_image,
    open_zarr_image,
    read_zarr_labels,
    write_image_zarr,
)

zarr = pytest.importorskip("zarr")


def _ome_image(path, data, axes, scale, global_scale=None, zarr_format=2):
    """An OME-Zarr image written with the zarr API directly (independent of our writer)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.create_array("0", shape=data.shape, chunks=tuple(min(8, n) for n in data.shape), dtype=data.dtype)[...] = data
    group.create_array("1", shape=(1,) * data.ndim, dtype=data.dtype)
    ms = {
        "version": "0.4" if zarr_format == 2 else "0.5",
        "axes": [{"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space"), **({"unit": "micrometer"} if a in "zyx" else {})}
                 for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]},
                     {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [9.0] * len(axes)}]}],
    }
    if global_scale is not None:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": global_scale}]
    if zarr_format == 2:
        group.attrs["multiscales"] = [ms]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def test_ome_zarr_level0_axes_voxel_size_and_regions(tmp_path):
    data = np.arange(1 * 2 * 5 * 6 * 7, dtype=np.uint16).reshape(1, 2, 5, 6, 7)
    path = _ome_image(tmp_path / "img.zarr", data, "tczyx", [1, 1, 2.0, 0.5, 0.25], [1, 1, 1, 2, 2])
    image = open_zarr_image(path, ndim=3)
    assert image.axes == "TCZYX" and image.path == path / "0" and image.group == path
    assert image.voxel_size == (2.0, 1.0, 0.5) and image.unit == "micrometer"
    assert image.spatial_shape == (5, 6, 7) and image.n_channels == 2 and image.dtype == np.uint16
    region = (slice(1, 4), slice(0, 6, 2), slice(3, 7))
    np.testing.assert_array_equal(image.read(region), data[0][(slice(None), *region)])
    # the level array itself keeps the image's metadata
    level = open_zarr_image(path / "0")
    assert (level.axes, level.voxel_size) == ("TCZYX", (2.0, 1.0, 0.5))


def test_ome_zarr_v05_zarr3_and_channel_last_override(tmp_path):
    data = np.random.default_rng(0).integers(0, 99, (6, 7, 3)).astype(np.uint8)
    path = _ome_image(tmp_path / "v5.zarr", data, "yxc", [0.3, 0.3, 1], zarr_format=3)
    image = open_zarr_image(path)
    assert image.axes == "YXC" and image.voxel_size == (0.3, 0.3)
    np.testing.assert_array_equal(image.read(), np.moveaxis(data, -1, 0))


def test_plain_arrays_axes_from_ndim_names_or_argument(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "plain.zarr"
    zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, zarr_format=2)[...] = data
    with pytest.raises(UserError, match="pass --axes"):
        open_zarr_image(path)
    assert open_zarr_image(path, ndim=3).axes == "ZYX"
    assert open_zarr_image(path, ndim=2).axes == "CYX"
    swapped = open_zarr_image(path, axes="yxc")
    assert swapped.spatial_shape == (4, 5) and swapped.n_channels == 6
    np.testing.assert_array_equal(swapped.read((slice(1, 3), slice(None))), np.moveaxis(data[1:3], -1, 0))
    named = zarr.create_array(str(tmp_path / "named.zarr"), shape=(3, 4, 5), dtype="u1", zarr_format=2)
    named.attrs["_ARRAY_DIMENSIONS"] = ["c", "y", "x"]
    assert open_zarr_image(tmp_path / "named.zarr").axes == "CYX"
    assert open_zarr_image(path, ndim=3).voxel_size is None


def test_reading_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not a zarr"):
        open_zarr_image(tmp_path)
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    with pytest.raises(UserError, match="without OME-Zarr"):
        open_zarr_image(tmp_path / "g.zarr")
    series = _ome_image(tmp_path / "t.zarr", np.zeros((3, 4, 5), np.uint8), "tyx", [1, 1, 1])
    with pytest.raises(UserError, match="time series"):
        open_zarr_image(series)
    flat = _ome_image(tmp_path / "f.zarr", np.zeros((4, 5), np.uint8), "yx", [1, 1])
    with pytest.raises(UserError, match="3D is expected"):
        open_zarr_image(flat, ndim=3)
    with pytest.raises(UserError, match="do not fit"):
        open_zarr_image(flat, axes="zyx")


def test_label_image_metadata_follows_ngff_04(tmp_path):
    path = tmp_path / "cells.zarr"
    array = create_label_image(path, (20, 30, 40), (8, 16, 16), voxel_size=(2.0, 0.5, 0.5), unit="micrometer",
                               attributes={"embseg": {"complete": False}})
    array[2:5, 3:9, 4:6] = 7
    attrs = json.loads((path / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4" and ms["name"] == "cells"
    assert ms["axes"] == [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]
    assert attrs["image-label"] == {"version": "0.4"} and attrs["embseg"] == {"complete": False}
    assert json.loads((path / ".zgroup").read_text()) == {"zarr_format": 2}
    meta = json.loads((path / "0" / ".zarray").read_text())
    assert meta["dtype"] == "<u4" and meta["chunks"] == [8, 16, 16] and meta["dimension_separator"] == "/"
    assert meta["compressor"]["id"] == "zlib" and meta["fill_value"] == 0
    assert (path / "0" / "0" / "0" / "0").is_file()  # nested chunk keys
    back = read_zarr_labels(path)
    assert back.shape == (20, 30, 40) and int(back.sum()) == 7 * 3 * 6 * 2
    with pytest.raises(UserError, match="already exists"):
        create_label_image(path, (2, 2), (2, 2))


def test_labels_inside_an_ome_zarr_image(tmp_path):
    image = write_image_zarr(tmp_path / "img.zarr", np.zeros((3, 16, 16), np.uint16), "CYX", voxel_size=(0.5, 0.5))
    assert is_zarr(image)
    target = label_group_in_image(image, "nuclei")
    assert target == image / "labels" / "nuclei"
    create_label_image(target, (16, 16), (8, 8), voxel_size=(0.5, 0.5), source_image="../../")
    assert label_group_in_image(image, "nuclei") == target  # registered once
    label_group_in_image(image, "cells")
    labels_attrs = json.loads((image / "labels" / ".zattrs").read_text())
    assert labels_attrs == {"labels": ["nuclei", "cells"]}
    label_attrs = json.loads((target / ".zattrs").read_text())
    assert label_attrs["image-label"] == {"version": "0.4", "source": {"image": "../../"}}
    opened = open_zarr_image(target)
    assert opened.axes == "YX" and opened.voxel_size == (0.5, 0.5)
    with pytest.raises(UserError, match="plain folder name"):
        label_group_in_image(image, "../x")
    with pytest.raises(UserError, match="not an OME-Zarr image"):
        label_group_in_image(image / "labels", "x")


def test_write_image_zarr_canonical_axes_and_chunks(tmp_path):
    data = np.random.default_rng(1).random((10, 12, 2)).astype(np.float32)
    path = write_image_zarr(tmp_path / "rgb.zarr", data, "YXC", chunks=(4, 4))
    image = open_zarr_image(path)
    assert image.axes == "CYX" and image.array.chunks == (2, 4, 4)
    np.testing.assert_array_equal(image.read(), np.moveaxis(data, -1, 0))
    ms = json.loads((path / ".zattrs").read_text())["multiscales"][0]
    assert [a["type"] for a in ms["axes"]] == ["channel", "space", "space"]


def test_block_aligned_chunks_tile_blocks():
    assert block_aligned_chunks((64, 512, 1000)) == (64, 256, 250)
    assert block_aligned_chunks((300, 96)) == (150, 96)
    for block in [(64, 512, 1000), (300, 96), (2048, 2048)]:
        assert all(b % c == 0 for b, c in zip(block, block_aligned_chunks(block), strict=True))


def test_napari_ome_zarr_reader_sees_a_labels_layer(tmp_path):
    """ome-zarr-py (what napari-ome-zarr uses) reads the output as a label image, if installed."""
    reader = pytest.importorskip("ome_zarr.reader")
    io = pytest.importorskip("ome_zarr.io")
    path = tmp_path / "seg.zarr"
    create_label_image(path, (8, 8), (4, 4))[...] = 3
    nodes = list(reader.Reader(io.parse_url(str(path)))())
    assert any(isinstance(spec, reader.Label) for node in nodes for spec in node.specs)
    assert int(np.asarray(nodes[0].data[0]).max()) == 3
