"""Tests of embseg.io: reading with axes, label checks, atomic writes, folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from embseg.errors import UserError
from embseg.io import (
    atomic_write,
    canonical_axes,
    check_finite,
    list_inputs,
    pair_folders,
    read_image,
    read_labels,
    to_channel_first,
    validate_pair,
    write_image,
    write_labels,
)

DATA = Path("/work/shared/data")


def ramp(shape, dtype=np.uint16):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------- axes


def test_to_channel_first_transposes():
    array = ramp((4, 5, 3))
    out = to_channel_first(array, "YXC")
    assert out.shape == (3, 4, 5)
    assert out[2, 1, 4] == array[1, 4, 2]
    assert to_channel_first(ramp((2, 3, 4, 5)), "zcyx").shape == (3, 2, 4, 5)
    # no C: a channel axis of length 1 is added, as the network expects
    assert to_channel_first(ramp((4, 5)), "YX").shape == (1, 4, 5)
    volume = ramp((2, 4, 5))
    np.testing.assert_array_equal(to_channel_first(volume, "ZYX")[0], volume)
    assert to_channel_first(ramp((5, 4, 2)), "XYZ").shape == (1, 2, 4, 5)
    assert canonical_axes("XZCY") == "CZYX"


@pytest.mark.parametrize(
    "axes, message",
    [("YXT", "letters"), ("YYX", "repeat"), ("CZY", "Y and X"), ("YX", "name 2 axes")],
)
def test_to_channel_first_rejects_bad_axes(axes, message):
    with pytest.raises(UserError, match=message):
        to_channel_first(ramp((4, 5, 3)), axes)


def test_read_2d_is_yx(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, ramp((6, 7)))
    image, axes = read_image(path)
    assert axes == "YX" and image.shape == (6, 7) and image.dtype == np.uint16
    np.testing.assert_array_equal(image, ramp((6, 7)))


def test_read_3d_without_metadata_needs_ndim(tmp_path):
    path = tmp_path / "a.tif"
    data = ramp((5, 6, 7))
    tifffile.imwrite(path, data)  # tifffile's own metadata says only "QYX"
    with pytest.raises(UserError, match=r"a\.tif.*--axes"):
        read_image(path)
    image, axes = read_image(path, ndim=3)
    assert axes == "ZYX"
    np.testing.assert_array_equal(image, data)
    image, axes = read_image(path, ndim=2)
    assert axes == "CYX" and image.shape == (5, 6, 7)


def test_read_explicit_axes(tmp_path):
    path = tmp_path / "a.tif"
    data = ramp((6, 7, 2))
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None)
    image, axes = read_image(path, axes="YXC")
    assert axes == "CYX" and image.shape == (2, 6, 7)
    np.testing.assert_array_equal(image[1], data[..., 1])
    image, axes = read_image(path, axes="ZYX")
    assert axes == "ZYX" and image.shape == (6, 7, 2)
    with pytest.raises(UserError, match=r"a\.tif.*3"):
        read_image(path, axes="YX")
    with pytest.raises(UserError, match=r"a\.tif.*2D images, but 3D"):
        read_image(path, axes="YXC", ndim=3)


def test_read_imagej_hyperstack_axes(tmp_path):
    zcyx = ramp((3, 2, 6, 7))
    tifffile.imwrite(tmp_path / "zc.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    image, axes = read_image(tmp_path / "zc.tif")
    assert axes == "CZYX" and image.shape == (2, 3, 6, 7)
    np.testing.assert_array_equal(image[1, 2], zcyx[2, 1])
    tifffile.imwrite(tmp_path / "z.tif", ramp((4, 6, 7)), imagej=True, metadata={"axes": "ZYX"})
    assert read_image(tmp_path / "z.tif")[1] == "ZYX"
    tifffile.imwrite(tmp_path / "c.tif", ramp((2, 6, 7)), imagej=True, metadata={"axes": "CYX"})
    assert read_image(tmp_path / "c.tif")[1] == "CYX"
    # metadata that contradicts the model's ndim is not overridden silently
    with pytest.raises(UserError, match=r"c\.tif.*--axes"):
        read_image(tmp_path / "c.tif", ndim=3)


def test_read_4d_default_czyx(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, ramp((2, 3, 6, 7)), photometric="minisblack")
    image, axes = read_image(path)
    assert axes == "CZYX" and image.shape == (2, 3, 6, 7)
    with pytest.raises(UserError, match="2D is expected"):
        read_image(path, ndim=2)


def test_read_rgb(tmp_path):
    path = tmp_path / "rgb.tif"
    data = ramp((6, 7, 3), np.uint8)
    tifffile.imwrite(path, data, photometric="rgb")
    image, axes = read_image(path)
    assert axes == "CYX" and image.shape == (3, 6, 7)
    np.testing.assert_array_equal(image[0], data[..., 0])
    image, axes = read_image(path, ndim=2)
    assert axes == "CYX"


def test_read_time_axis_refused(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, ramp((3, 6, 7)), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(UserError, match=r"t\.tif.*T"):
        read_image(path, ndim=3)
    assert read_image(path, axes="ZYX")[1] == "ZYX"


def test_read_5d_refused(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, ramp((2, 2, 3, 6, 7)), photometric="minisblack")
    with pytest.raises(UserError, match=r"a\.tif: a 5D array"):
        read_image(path)
    with pytest.raises(UserError, match=r"a\.tif.*expected 2D or 3D"):
        read_labels(path)


def test_read_1d_refused(tmp_path, monkeypatch):
    # tifffile cannot write a 1D TIFF; stand in for one that reads back 1D
    import embseg.io

    monkeypatch.setattr(embseg.io, "_read_tiff", lambda path: (np.zeros(7, np.uint8), "X"))
    with pytest.raises(UserError, match=r"line\.tif: a 1D array"):
        read_image(tmp_path / "line.tif")


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"missing\.tif: no such file"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "text.tif").write_text("hello, not a tiff")
    with pytest.raises(UserError, match=r"text\.tif: not a readable TIFF"):
        read_image(tmp_path / "text.tif")
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, ramp((100, 100)))
    data = whole.read_bytes()
    for name, cut in (("half.tif", len(data) // 2), ("head.tif", 50)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            read_labels(tmp_path / name)
    with pytest.raises(UserError, match="folder"):
        read_image(tmp_path)


def test_check_finite(tmp_path):
    path = tmp_path / "f.tif"
    data = np.ones((4, 4), np.float32)
    data[1, 2] = np.nan
    data[0, 0] = np.inf
    tifffile.imwrite(path, data)
    image, _ = read_image(path)  # reading is allowed
    with pytest.raises(UserError, match=r"f\.tif: 2 of 16 pixels"):
        check_finite(image, path)
    check_finite(np.ones((3, 3)), path)
    check_finite(np.ones((3, 3), np.uint8), path)


# ---------------------------------------------------------------------------- labels


@pytest.mark.parametrize("shape", [(9, 11), (4, 9, 11)])
def test_label_round_trip(tmp_path, shape):
    labels = (ramp(shape, np.int64) % 17).astype(np.int32) * 3
    path = write_labels(tmp_path / "l.tif", labels)
    back = read_labels(path)
    assert back.dtype == np.uint16 and back.shape == shape
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    # the axes are recorded: no ndim needed to read it back as an image
    assert read_image(path)[1] == ("YX" if len(shape) == 2 else "ZYX")


def test_label_dtype_choice(tmp_path):
    small = np.zeros((3, 3), np.int64)
    small[0, 0] = 65535
    big = small.copy()
    big[1, 1] = 65536
    assert read_labels(write_labels(tmp_path / "s.tif", small)).dtype == np.uint16
    back = read_labels(write_labels(tmp_path / "b.tif", big))
    assert back.dtype == np.uint32 and back[1, 1] == 65536


def test_label_writer_refuses_bad_labels(tmp_path):
    with pytest.raises(UserError, match="negative"):
        write_labels(tmp_path / "n.tif", -np.ones((3, 3), np.int32))
    with pytest.raises(ValueError):
        write_labels(tmp_path / "d.tif", np.zeros(5, np.int32))
    assert not list(tmp_path.iterdir())


def test_read_labels_casts_and_checks(tmp_path):
    tifffile.imwrite(tmp_path / "float.tif", np.array([[0, 1.0], [2.0, 3.0]], np.float32))
    labels = read_labels(tmp_path / "float.tif")
    assert labels.dtype == np.uint32 and labels.tolist() == [[0, 1], [2, 3]]
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0, 1.5]], np.float32))
    with pytest.raises(UserError, match=r"frac\.tif.*non-integer"):
        read_labels(tmp_path / "frac.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -1]], np.int16))
    with pytest.raises(UserError, match=r"neg\.tif.*negative"):
        read_labels(tmp_path / "neg.tif")
    tifffile.imwrite(tmp_path / "bool.tif", np.array([[0, 1], [1, 1]], bool))
    mask = read_labels(tmp_path / "bool.tif")
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 1], [1, 1]]
    tifffile.imwrite(tmp_path / "v.tif", ramp((2, 3, 4)), metadata={"axes": "ZYX"})
    with pytest.raises(UserError, match=r"v\.tif.*expected 2D"):
        read_labels(tmp_path / "v.tif", ndim=2)
    tifffile.imwrite(tmp_path / "one.tif", ramp((1, 3, 4)), metadata={"axes": "ZYX"})
    assert read_labels(tmp_path / "one.tif", ndim=2).shape == (3, 4)
    tifffile.imwrite(tmp_path / "rgb.tif", ramp((3, 4, 3), np.uint8), photometric="rgb")
    with pytest.raises(UserError, match=r"rgb\.tif.*RGB"):
        read_labels(tmp_path / "rgb.tif")


def test_validate_pair():
    image = np.zeros((2, 5, 6))
    validate_pair(image, "CYX", np.zeros((5, 6), int), "img.tif", "mask.tif")
    with pytest.raises(UserError, match=r"img\.tif.*mask\.tif"):
        validate_pair(image, "CYX", np.zeros((5, 7), int), "img.tif", "mask.tif")
    with pytest.raises(UserError, match=r"img\.tif.*mask\.tif"):
        validate_pair(np.zeros((3, 5, 6)), "ZYX", np.zeros((5, 6), int), "img.tif", "mask.tif")


def test_write_image_float_map(tmp_path):
    seed = np.linspace(0, 1, 4 * 5 * 6).reshape(4, 5, 6)
    path = write_image(tmp_path / "seed.tif", seed)
    image, axes = read_image(path)
    assert axes == "ZYX" and image.dtype == np.float32
    np.testing.assert_allclose(image, seed, rtol=1e-6)
    path = write_image(tmp_path / "c.tif", seed.astype(np.float32), axes="CYX")
    assert read_image(path)[1] == "CYX"
    with pytest.raises(UserError, match="exists"):
        write_image(path, seed)


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_refuses_overwrite(tmp_path):
    path = tmp_path / "l.tif"
    write_labels(path, np.ones((3, 3), np.uint8))
    with pytest.raises(UserError, match=r"l\.tif: already exists"):
        write_labels(path, np.zeros((3, 3), np.uint8))
    assert read_labels(path).max() == 1
    write_labels(path, np.full((3, 3), 2, np.uint8), overwrite=True)
    assert read_labels(path).max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.tif"]


def test_atomic_write_cleans_up_on_error(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json"
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed overwrite untouched
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, overwrite=True) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_no_clobber_when_file_appears(tmp_path):
    path = tmp_path / "x.txt"
    with pytest.raises(UserError, match="already exists"):
        with atomic_write(path) as tmp:
            tmp.write_text("mine")
            path.write_text("someone else's")
    assert path.read_text() == "someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_write_creates_parents_and_keeps_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    with atomic_write(path) as tmp:
        tmp.write_text("ok")
    assert path.read_text() == "ok"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------------------- folders


def touch_tiffs(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        tifffile.imwrite(folder / name, np.zeros((2, 2), np.uint8))


def test_pair_folders_by_name(tmp_path):
    touch_tiffs(tmp_path / "img", ["b.tif", "a.tiff", "c.TIF"])
    touch_tiffs(tmp_path / "msk", ["a.tif", "c.tif", "b.tiff"])
    (tmp_path / "img" / "notes.txt").write_text("ignored")
    pairs = pair_folders(tmp_path / "img", tmp_path / "msk")
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.tiff", "a.tif"),
        ("b.tif", "b.tiff"),
        ("c.TIF", "c.tif"),
    ]


def test_pair_folders_lists_all_unmatched(tmp_path):
    touch_tiffs(tmp_path / "img", [f"i{k:02d}.tif" for k in range(13)] + ["both.tif"])
    touch_tiffs(tmp_path / "msk", ["both.tif", "lonely.tif"])
    with pytest.raises(UserError) as info:
        pair_folders(tmp_path / "img", tmp_path / "msk")
    message = str(info.value)
    assert "\n" not in message
    assert "13 image file(s)" in message and "i00.tif" in message and "i09.tif" in message
    assert "i10.tif" not in message and "and 3 more" in message
    assert "1 mask file(s)" in message and "lonely.tif" in message


def test_pair_folders_errors(tmp_path):
    touch_tiffs(tmp_path / "img", ["a.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"nowhere: no such folder"):
        pair_folders(tmp_path / "img", tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"empty: no \.tif"):
        pair_folders(tmp_path / "img", tmp_path / "empty")
    touch_tiffs(tmp_path / "dup", ["a.tif", "a.tiff"])
    with pytest.raises(UserError, match="both"):
        pair_folders(tmp_path / "img", tmp_path / "dup")


def test_list_inputs(tmp_path):
    touch_tiffs(tmp_path / "d", ["b.tif", "a.tiff"])
    (tmp_path / "d" / "skip.png").write_bytes(b"")
    touch_tiffs(tmp_path, ["x.tif", "y.tif"])
    found = list_inputs([str(tmp_path / "x.tif"), tmp_path / "d", str(tmp_path / "*.tif")])
    assert [p.name for p in found] == ["x.tif", "a.tiff", "b.tif", "y.tif"]
    assert list_inputs(str(tmp_path / "d")) == [tmp_path / "d" / "a.tiff", tmp_path / "d" / "b.tif"]
    with pytest.raises(UserError, match="no such file"):
        list_inputs([str(tmp_path / "nope.tif")])
    with pytest.raises(UserError, match="matches no file"):
        list_inputs([str(tmp_path / "*.zarr")])
    with pytest.raises(UserError, match="no input"):
        list_inputs([])
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match=r"e: the folder holds no"):
        list_inputs([tmp_path / "e"])


# ---------------------------------------------------------------------------- real data


def test_real_data_pairs():
    folder = DATA / "qcanet_embryo_3d" / "train"
    if not folder.exists():
        pytest.skip("real data not available")
    pairs = pair_folders(folder / "images", folder / "masks")
    image_path, mask_path = pairs[0]
    with pytest.raises(UserError, match="--axes"):
        read_image(image_path)
    image, axes = read_image(image_path, ndim=3)
    labels = read_labels(mask_path, ndim=3)
    assert axes == "ZYX" and image.shape == (51, 120, 122)
    validate_pair(image, axes, labels, image_path, mask_path)
    assert len(np.unique(labels)) - 1 == 8
