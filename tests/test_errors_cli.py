"""A catalogue of bad inputs: each one gives exit code 2 and one line naming the file and the
problem (a traceback only with ``--debug``), or works where it can (tiny and constant images).

Most cases run ``embseg.cli.main`` in-process; two run the installed ``embseg`` script to prove
the exit codes of the real process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from embseg.cli import main
from embseg.config import ModelConfig
from embseg.errors import UserError
from embseg.io import read_labels
from embseg.model import Model

# --------------------------------------------------------------------------------- helpers


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``embseg argv`` run in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit code 2 and a single ``embseg...: error:`` line that holds every fragment."""
    code, _, err = result
    line = err.strip()
    assert code == 2, err
    assert "\n" not in line, f"not one line: {err!r}"
    assert line.startswith("embseg") and ": error: " in line, line
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def disc_labels(shape: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` non-touching discs of radius 4-6 (ids 1..n) on a 2D grid."""
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    placed = 0
    while placed < n:
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        r = int(rng.integers(4, 7))
        distance = (yy - cy) ** 2 + (xx - cx) ** 2
        if labels[distance <= (r + 2) ** 2].any():  # keep a gap to the others
            continue
        disc = distance <= r * r
        placed += 1
        labels[disc] = placed
    return labels


def write_pairs(root: Path, n: int = 3, shape: tuple[int, int] = (48, 48), seed: int = 0) -> tuple[Path, Path]:
    """``root/images`` and ``root/masks`` with ``n`` synthetic image/mask pairs."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        labels = disc_labels(shape, 3, rng)
        image = (labels > 0) * 180 + rng.integers(0, 40, shape)
        tifffile.imwrite(images / f"img{i}.tif", image.astype(np.uint8))
        tifffile.imwrite(masks / f"img{i}.tif", labels)
    return images, masks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained model folders: 2D, 3D and 2D with two input channels."""
    root = tmp_path_factory.mktemp("models")
    configs = {
        "2d": ModelConfig(ndim=2, min_size=5, name="m2d"),
        "3d": ModelConfig(ndim=3, grid_step=[1 / 1023] * 3, min_size=5, name="m3d"),
        "2ch": ModelConfig(ndim=2, in_channels=2, min_size=5, name="m2ch"),
    }
    out = {}
    for key, config in configs.items():
        out[key] = Model(config).save(root / key)
    return out


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    """A valid 48x48 uint8 image file."""
    path = tmp_path / "good.tif"
    tifffile.imwrite(path, np.random.default_rng(1).integers(0, 255, (48, 48)).astype(np.uint8))
    return path


def predict(capsys, model: Path, *inputs, output: Path, extra: tuple = ()) -> tuple[int, str, str]:
    return run_cli(capsys, "predict", *inputs, "-m", model, "-o", output, "--quiet", *extra)


# --------------------------------------------------------------------------------- input files


def test_missing_file(capsys, models, tmp_path):
    result = predict(capsys, models["2d"], tmp_path / "nope.tif", output=tmp_path / "out")
    assert_user_error(result, "nope.tif", "no such file")


def test_unreadable_file(capsys, models, image, tmp_path, monkeypatch):
    # root ignores file modes, so the refusal is simulated where chmod would not do it
    if os.geteuid() != 0:
        image.chmod(0)
    else:
        def refuse(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(tifffile, "TiffFile", refuse)
    result = predict(capsys, models["2d"], image, output=tmp_path / "out")
    assert_user_error(result, "good.tif", "cannot read", "ermission denied")


def test_not_a_tiff(capsys, models, tmp_path):
    fake = tmp_path / "notes.tif"
    fake.write_text("these are not pixels")
    assert_user_error(predict(capsys, models["2d"], fake, output=tmp_path / "out"), "notes.tif", "not a readable TIFF")


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_tiff(capsys, models, image, tmp_path, keep):
    data = image.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    line = assert_user_error(predict(capsys, models["2d"], cut, output=tmp_path / "out"), "cut.tif")
    assert "truncated" in line or "not a readable TIFF" in line


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((48,), "a 1D array"), ((2, 2, 3, 24, 24), "a 5D array"), ((2, 3, 24, 24), "2D is expected")],
)
def test_wrong_number_of_dimensions(capsys, models, tmp_path, shape, expected):
    path = tmp_path / "odd.tif"
    # tifffile refuses a photometric tag for a 1D array (recent releases); write it plainly.
    extra = {"photometric": "minisblack"} if len(shape) > 1 else {}
    tifffile.imwrite(path, np.zeros(shape, np.uint8), **extra)
    assert_user_error(predict(capsys, models["2d"], path, output=tmp_path / "out"), "odd.tif", expected)


@pytest.mark.parametrize(
    ("axes", "expected"),
    [("ZYX", "name 3 axes but the array has 2"), ("TX", "may only use the letters"), ("YY", "repeat a letter")],
)
def test_axes_that_do_not_fit(capsys, models, image, tmp_path, axes, expected):
    result = predict(capsys, models["2d"], image, output=tmp_path / "out", extra=("--axes", axes))
    assert_user_error(result, "good.tif", expected)


def test_rgb_image_to_grey_model(capsys, models, tmp_path):
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, np.zeros((48, 48, 3), np.uint8), photometric="rgb")
    result = predict(capsys, models["2d"], path, output=tmp_path / "out")
    assert_user_error(result, "colour.tif", "3 channel(s)", "expects 1", "one channel")


def test_channel_count_differs_from_model(capsys, models, image, tmp_path):
    result = predict(capsys, models["2ch"], image, output=tmp_path / "out")
    assert_user_error(result, "good.tif", "1 channel(s)", "expects 2")


def test_volume_to_2d_model(capsys, models, tmp_path):
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, np.zeros((5, 48, 48), np.uint8), metadata={"axes": "ZYX"})
    assert_user_error(predict(capsys, models["2d"], path, output=tmp_path / "out"), "vol.tif", "2D is expected")


def test_plane_to_3d_model(capsys, models, image, tmp_path):
    assert_user_error(predict(capsys, models["3d"], image, output=tmp_path / "out"), "good.tif", "3D is expected")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels(capsys, models, tmp_path, bad):
    pixels = np.ones((48, 48), np.float32)
    pixels[3, 4] = bad
    path = tmp_path / "holes.tif"
    tifffile.imwrite(path, pixels)
    assert_user_error(predict(capsys, models["2d"], path, output=tmp_path / "out"), "holes.tif", "NaN or Inf")


def test_constant_image_predicts_no_objects(capsys, models, tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((48, 48), 7, np.uint16))
    code, _, err = predict(capsys, models["2d"], path, output=tmp_path / "out")
    assert code == 0, err
    labels = read_labels(tmp_path / "out" / "flat.tif")
    assert labels.shape == (48, 48) and labels.max() == 0


@pytest.mark.parametrize("shape", [(5, 5), (1, 1), (3, 70)])
def test_image_smaller_than_the_stride_works(capsys, models, tmp_path, shape):
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8))
    code, _, err = predict(capsys, models["2d"], path, output=tmp_path / "out")
    assert code == 0, err
    assert read_labels(tmp_path / "out" / "small.tif").shape == shape


def test_empty_input_folder(capsys, models, tmp_path):
    (tmp_path / "empty").mkdir()
    result = predict(capsys, models["2d"], tmp_path / "empty", output=tmp_path / "out")
    assert_user_error(result, "empty", "holds no .tif")


def test_pattern_matching_nothing(capsys, models, tmp_path):
    result = predict(capsys, models["2d"], tmp_path / "*.tif", output=tmp_path / "out")
    assert_user_error(result, "*.tif", "matches no file")


# --------------------------------------------------------------------------------- models


def test_unknown_model_name_suggests(capsys, models, image, tmp_path, monkeypatch):
    import embseg.model

    shipped = tmp_path / "pretrained"
    shutil.copytree(models["2d"], shipped / "nuclei-2d")
    monkeypatch.setattr(embseg.model, "PRETRAINED_DIR", shipped)
    result = run_cli(capsys, "predict", image, "-m", "nuclei-2e", "-o", tmp_path / "out")
    assert_user_error(result, "nuclei-2e", "did you mean 'nuclei-2d'?", "shipped models: nuclei-2d")
    # the shipped name itself loads
    code, _, err = run_cli(capsys, "predict", image, "-m", "nuclei-2d", "-o", tmp_path / "out", "--quiet")
    assert code == 0, err


def _broken_model(models, tmp_path, name: str = "broken") -> Path:
    folder = tmp_path / name
    shutil.copytree(models["2d"], folder)
    return folder


def test_model_config_garbage(capsys, models, image, tmp_path):
    folder = _broken_model(models, tmp_path)
    (folder / "config.json").write_text("{ndim: 2,,")
    result = predict(capsys, folder, image, output=tmp_path / "out")
    assert_user_error(result, "config.json", "corrupt model config")


@pytest.mark.parametrize("keep", [0.5, 0.0001, 0.0])
def test_model_weights_truncated(capsys, models, image, tmp_path, keep):
    folder = _broken_model(models, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    result = predict(capsys, folder, image, output=tmp_path / "out")
    assert_user_error(result, "model.safetensors", "corrupt or truncated")


def test_model_weights_missing(capsys, models, image, tmp_path):
    folder = _broken_model(models, tmp_path)
    (folder / "model.safetensors").unlink()
    assert_user_error(predict(capsys, folder, image, output=tmp_path / "out"), "no weights file")


def test_model_from_a_newer_version(capsys, models, image, tmp_path):
    folder = _broken_model(models, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    result = predict(capsys, folder, image, output=tmp_path / "out")
    assert_user_error(result, "config.json", "format version 99 is newer", "upgrade embseg")


def test_model_config_mistyped_key(capsys, models, image, tmp_path):
    folder = _broken_model(models, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["seed_tresh"] = config.pop("seed_thresh")
    (folder / "config.json").write_text(json.dumps(config))
    result = predict(capsys, folder, image, output=tmp_path / "out")
    assert_user_error(result, "config.json", "'seed_tresh'", "did you mean 'seed_thresh'?")


# --------------------------------------------------------------------------------- configs and flags


def test_yaml_mistyped_key(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epoch: 3\nbatch_size: 4\n")
    result = run_cli(capsys, "train", "--config", config, "--print-config")
    assert_user_error(result, "run.yaml", "unknown key 'epoch'", "did you mean 'epochs'?")


def test_yaml_not_yaml(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: [3,\n")
    assert_user_error(run_cli(capsys, "train", "--config", config, "--print-config"), "run.yaml", "not valid YAML")


def test_yaml_wrong_type(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: three\n")
    result = run_cli(capsys, "train", "--config", config, "--print-config")
    assert_user_error(result, "run.yaml", "epochs = 'three' is not a valid int")


def test_missing_config_file(capsys, tmp_path):
    result = run_cli(capsys, "train", "--config", tmp_path / "nope.yaml", "--print-config")
    assert_user_error(result, "nope.yaml", "not found")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("train", "--epoch", "3"), "did you mean '--epochs'?"),
        (("predict", "a.tif", "-m", "m", "-o", "o", "--tile-sise", "64"), "did you mean '--tile-shape'?"),
        (("evaluate", "gt", "pred", "--jsn", "x.json"), "did you mean '--json'?"),
    ],
)
def test_unknown_flag_suggests(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "unrecognized arguments" in err and expected in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_command_suggests(capsys):
    code, _, err = run_cli(capsys, "trian", "--epochs", "3")
    assert code == 2
    assert "unknown command 'trian'" in err and "did you mean 'train'?" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--seed-thresh", "-1"), "seed_thresh must be in (0, 1)"),
        (("--seed-thresh", "1.5"), "seed_thresh must be in (0, 1)"),
        (("--fg-thresh", "0"), "fg_thresh must be in (0, 1)"),
        (("--min-size", "-3"), "min_size must be >= 0"),
        (("--tile-shape", "0"), "values must be positive"),
        (("--tile-shape", "-64"), "values must be positive"),
        (("--tile-shape", "4"), "must be >= 8"),
        (("--tile-shape", "abc"), "expected integers"),
        (("--tile-shape", "32,32,32"), "must have 2 values"),
        (("--device", "gpu7"), "unknown device 'gpu7'"),
    ],
)
def test_bad_predict_values(capsys, models, image, tmp_path, flags, expected):
    assert_user_error(predict(capsys, models["2d"], image, output=tmp_path / "out", extra=flags), expected)


def test_predict_clustering_routes_from_the_cli(capsys, models, image, tmp_path):
    import tifffile

    shapes = []
    for route in ("blocks", "global"):
        code, _, err = predict(capsys, models["2d"], image, output=tmp_path / route,
                               extra=("--tile-shape", "16", "--clustering", route))
        assert code == 0, err
        (written,) = sorted((tmp_path / route).glob("*.tif"))
        shapes.append(tifffile.imread(written).shape)
    assert shapes[0] == shapes[1]
    assert_user_error(predict(capsys, models["2d"], image, output=tmp_path / "x", extra=("--clustering", "nearest")),
                      "invalid choice")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--epochs", "0"), "epochs must be >= 1"),
        (("--epochs", "-2"), "epochs must be >= 1"),
        (("--epochs", "2.5"), "is not a valid int"),
        (("--batch-size", "0"), "batch_size must be >= 1"),
        (("--lr", "0"), "lr must be > 0"),
        (("--seed-thresh", "-0.1"), "seed_thresh must be in [0, 1]"),
        (("--crop-size", "30"), "multiples of 8"),
        (("--center", "middle"), "center must be"),
    ],
)
def test_bad_train_values(capsys, flags, expected):
    assert_user_error(run_cli(capsys, "train", *flags, "--print-config"), expected)


def test_bad_evaluate_thresholds(capsys, tmp_path):
    assert_user_error(run_cli(capsys, "evaluate", tmp_path, tmp_path, "--thresholds", "a,b"), "--thresholds")


def test_evaluate_missing_folders(capsys, tmp_path):
    assert_user_error(run_cli(capsys, "evaluate", tmp_path / "gt", tmp_path / "pred"), "gt", "no such folder")


# --------------------------------------------------------------------------------- training data


@pytest.fixture()
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    return write_pairs(tmp_path / "data")


def train_cli(capsys, images: Path, masks: Path, output: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "--images", images, "--masks", masks, "--output", output, "--quiet",
                   "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "4", "--crop-size", "32",
                   "--no-tune", "--figure-every", "0", *extra)


def test_train_shape_mismatch(capsys, pairs, tmp_path):
    images, masks = pairs
    tifffile.imwrite(masks / "img1.tif", np.zeros((40, 48), np.uint16))
    result = train_cli(capsys, images, masks, tmp_path / "run")
    assert_user_error(result, "img1.tif", "differ in shape", "(48, 48)", "(40, 48)")


def test_train_mask_with_fractions(capsys, pairs, tmp_path):
    images, masks = pairs
    tifffile.imwrite(masks / "img0.tif", np.full((48, 48), 0.5, np.float32))
    assert_user_error(train_cli(capsys, images, masks, tmp_path / "run"), "img0.tif", "non-integer")


def test_train_mask_with_negative_labels(capsys, pairs, tmp_path):
    images, masks = pairs
    labels = np.zeros((48, 48), np.int16)
    labels[5:9, 5:9] = -3
    tifffile.imwrite(masks / "img2.tif", labels)
    assert_user_error(train_cli(capsys, images, masks, tmp_path / "run"), "img2.tif", "negative")


def test_train_all_masks_empty(capsys, pairs, tmp_path):
    images, masks = pairs
    for mask in masks.iterdir():
        tifffile.imwrite(mask, np.zeros((48, 48), np.uint16))
    result = train_cli(capsys, images, masks, tmp_path / "run")
    assert_user_error(result, "masks", "none of the 3 masks has any object")


def test_train_skips_a_single_empty_mask(pairs):
    from embseg.config import TrainConfig
    from embseg.training import load_training_data

    images, masks = pairs
    tifffile.imwrite(masks / "img1.tif", np.zeros((48, 48), np.uint16))
    data = load_training_data(TrainConfig(images=str(images), masks=str(masks), val_fraction=0.3))
    names = sorted(data.train_names + data.val_names)
    assert names == ["img0.tif", "img2.tif"]


def test_train_unpaired_names(capsys, pairs, tmp_path):
    images, masks = pairs
    (masks / "img2.tif").rename(masks / "other.tif")
    line = assert_user_error(train_cli(capsys, images, masks, tmp_path / "run"), "img2.tif", "other.tif")
    assert "without a mask" in line and "without a image" in line


def test_train_empty_image_folder(capsys, pairs, tmp_path):
    _, masks = pairs
    (tmp_path / "none").mkdir()
    assert_user_error(train_cli(capsys, tmp_path / "none", masks, tmp_path / "run"), "none", "no .tif/.tiff")


def test_train_output_is_a_file(capsys, pairs, tmp_path):
    (tmp_path / "taken").write_text("x")
    result = train_cli(capsys, *pairs, tmp_path / "taken")
    assert_user_error(result, "taken", "not a folder")
    result = train_cli(capsys, *pairs, tmp_path / "taken" / "below")
    assert_user_error(result, "below", "not writable")


def test_train_output_not_empty(capsys, pairs, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("x")
    assert_user_error(train_cli(capsys, *pairs, tmp_path / "run"), "run", "not empty", "--resume", "--overwrite")


# --------------------------------------------------------------------------------- outputs


def test_output_is_a_file(capsys, models, image, tmp_path):
    (tmp_path / "taken").write_text("x")
    result = predict(capsys, models["2d"], image, output=tmp_path / "taken")
    assert_user_error(result, "taken", "not a folder")
    result = predict(capsys, models["2d"], image, output=tmp_path / "taken" / "below")
    assert_user_error(result, "below", "cannot create output folder")


def test_output_exists_without_overwrite(capsys, models, image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.tif").write_bytes(b"previous")
    result = predict(capsys, models["2d"], image, output=out)
    assert_user_error(result, "1 output file(s) exist", "good.tif", "--overwrite")
    assert (out / "good.tif").read_bytes() == b"previous"


def test_explain_output_exists(capsys, models, image, tmp_path):
    (tmp_path / "fig.png").write_bytes(b"old")
    result = run_cli(capsys, "explain", image, "-m", models["2d"], "-o", tmp_path / "fig.png")
    assert_user_error(result, "fig.png", "--overwrite")


def test_disk_full_while_writing_labels(capsys, models, image, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.tif").write_bytes(b"previous result")
    real_imwrite = tifffile.imwrite

    def full_disk(path, data, **kwargs):
        real_imwrite(path, data[:2], **kwargs)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    result = predict(capsys, models["2d"], image, output=out, extra=("--overwrite",))
    assert_user_error(result, str(out / "good.tif"), "cannot write", "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["good.tif"]  # no temporary file left
    assert (out / "good.tif").read_bytes() == b"previous result"


def test_disk_full_while_training(capsys, pairs, tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    line = assert_user_error(train_cli(capsys, *pairs, out), "No space left on device", "cannot write")
    assert ".safetensors" in line and ".tmp" not in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_write_error_api_keeps_errno(tmp_path, monkeypatch):
    from embseg.io import write_labels

    def full_disk(path, data, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    with pytest.raises(OSError) as info:
        write_labels(tmp_path / "a.tif", np.ones((4, 4), np.uint16))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.tif")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- the API


def test_api_errors_match_the_cli(models):
    from embseg.model import load_model

    model = load_model(models["2d"])
    grey = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    with pytest.raises(UserError, match="NaN or Inf"):
        model.predict(np.where(grey > 0.5, np.nan, grey), device="cpu")
    with pytest.raises(UserError, match="a 3D array given to a 2D model"):
        model.predict(np.zeros((4, 48, 48)), device="cpu")
    with pytest.raises(UserError, match=r"3 channel\(s\) \(read as YXC\)"):
        model.predict(np.zeros((48, 48, 3)), axes="YXC", device="cpu")
    with pytest.raises(UserError, match="unsupported pixel type"):
        model.predict(np.zeros((48, 48), np.complex64), device="cpu")
    with pytest.raises(UserError, match=r"my_image\.tif"):
        model.predict(np.full((48, 48), np.inf), device="cpu", source="my_image.tif")
    flat = model.predict(np.full((48, 48), 3.0), device="cpu")
    assert flat.dtype == np.uint32 and flat.max() == 0
    assert model.predict(grey[:5, :5], device="cpu").shape == (5, 5)


# --------------------------------------------------------------------------------- real processes


def _embseg_command() -> list[str]:
    script = Path(sys.executable).parent / "embseg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "embseg.cli"]


def test_real_process_exit_codes_and_debug(tmp_path):
    missing = ["evaluate", str(tmp_path / "gt"), str(tmp_path / "pred")]
    plain = subprocess.run([*_embseg_command(), *missing], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and "no such folder" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*_embseg_command(), *missing, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_real_process_unknown_command(tmp_path):
    result = subprocess.run([*_embseg_command(), "trian"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "did you mean 'train'?" in result.stderr


def test_debug_reraises_in_process(models, tmp_path):
    with pytest.raises(UserError, match=r"nope\.tif"):
        main(["--debug", "predict", str(tmp_path / "nope.tif"), "-m", str(models["2d"]), "-o", str(tmp_path)])


def test_predict_amp_flag_reaches_the_model(capsys, models, image, tmp_path, monkeypatch):
    """`--amp` / `--no-amp` / neither give Model.predict amp=True / False / None, and run."""
    seen = []
    original = Model.predict

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("amp"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Model, "predict", spy)
    for flag, out in ((("--amp",), "a"), (("--no-amp",), "b"), ((), "c")):
        code, _, err = predict(capsys, models["2d"], image, output=tmp_path / out, extra=flag)
        assert code == 0, err
        assert (tmp_path / out / "good.tif").is_file()
    assert seen == [True, False, None]
