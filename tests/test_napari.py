"""napari plugin: manifest, sample data, Predict and Train widgets (headless, pytest-qt).

napari's OpenGL canvas needs an X display: an ``Xvfb`` server is started for the session when no
``DISPLAY`` is set (``.ci/run`` installs ``xvfb`` and the libraries of Qt's xcb platform). Qt
runs on ``xcb`` there when it starts, else on ``offscreen`` (``QT_QPA_PLATFORM`` set by the user
wins). Without napari, pytest-qt or an X display the module skips and says why.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

_ASKED_PLATFORM = os.environ.get("QT_QPA_PLATFORM")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

napari = pytest.importorskip("napari", reason="napari is not installed (pip install 'embseg[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (pip install 'embseg[napari]')")
pytest.importorskip("npe2", reason="npe2 is not installed (pip install 'embseg[napari]')")

from embseg.config import ModelConfig  # noqa: E402
from embseg.model import Model  # noqa: E402
from embseg.samples import list_samples, sample  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "embseg" / "napari" / "napari.yaml"
# How long to wait for a worker: generous, because these tests share the CPU with whatever else
# runs (a training job at a higher priority stretches a 2-epoch run from seconds to minutes);
# the waits end as soon as the worker's finished signal has been handled.
WAIT_S = float(os.environ.get("EMBSEG_NAPARI_WAIT_S", "900"))
WAIT_MS = int(WAIT_S * 1000)


def _start_xvfb() -> subprocess.Popen | None:
    """Start Xvfb on a free display and point ``DISPLAY`` at it (None when one is set)."""
    if os.environ.get("DISPLAY"):
        return None
    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.skip("napari needs an X display for OpenGL: no DISPLAY and no Xvfb "
                    "(apt-get install xvfb; .ci/run does)")
    read_fd, write_fd = os.pipe()
    # a watcher shell stops Xvfb once this process has exited (after Qt's last X request)
    watcher = f'"$0" "$@" & x=$!; while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill $x'
    proc = subprocess.Popen(["sh", "-c", watcher, binary, "-displayfd", str(write_fd), "-screen", "0",
                             "1280x1024x24", "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number, deadline = b"", time.monotonic() + 120
    while not number.endswith(b"\n") and select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(read_fd, 16)
        if not chunk:
            break
        number += chunk
    os.close(read_fd)
    number = number.decode().strip()
    if not number:
        proc.kill()
        pytest.skip("Xvfb did not start within 120 s")
    os.environ["DISPLAY"] = f":{number}"
    return proc


@pytest.fixture(scope="session", autouse=True)
def _display() -> Iterator[None]:
    """An X display for the whole session, started before the QApplication.

    It is not stopped at teardown: Qt still holds its X connection until the interpreter exits,
    and Xlib ends the process with an error if the server goes first. Xvfb gets SIGTERM when
    the watcher once pytest has exited.
    """
    _start_xvfb()
    if _ASKED_PLATFORM is None and _xcb_works():
        # Qt 6's offscreen platform has no OpenGL widgets, and vispy then sometimes gets no GL
        # context; on an X display (Xvfb) the xcb platform gives a real one.
        os.environ["QT_QPA_PLATFORM"] = "xcb"
    yield


def _xcb_works() -> bool:
    """Whether Qt's xcb platform starts here (it aborts the process when a library is missing)."""
    code = "from qtpy.QtWidgets import QApplication; QApplication([])"
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              timeout=WAIT_S).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def make_napari_viewer(make_napari_viewer):
    """napari's fixture, plus: no worker outlives the test.

    A worker still running when the viewer closes (a failed test) would go on in the next test
    and compete for the CPU. Before napari's fixture closes the viewers, every worker is asked to
    quit (the Train widget stops after its current epoch) and waited for.
    """
    from superqt.utils import WorkerBase  # napari's thread_worker makes these

    yield make_napari_viewer
    WorkerBase.await_workers(msecs=WAIT_MS)  # quit() to each, then wait; raises on timeout


@pytest.fixture(scope="session")
def model_2d(tmp_path_factory: pytest.TempPathFactory, qapp) -> Path:
    """A freshly initialised (untrained) 2D model folder: outputs are arbitrary but fixed.

    ``qapp`` first: the QApplication (and its OpenGL setup) is made before torch runs; the other
    order gave vispy no GL context on Xvfb in some runs.
    """
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model2d")
    Model(ModelConfig(ndim=2, name="tiny-2d")).save(folder)
    return folder


@pytest.fixture(scope="session")
def model_3d(tmp_path_factory: pytest.TempPathFactory, qapp) -> Path:
    """A freshly initialised 3D model folder."""
    import torch

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("model3d")
    Model(ModelConfig(ndim=3, grid_step=[2 / 1023, 1 / 1023, 1 / 1023], anisotropy=2.0, name="tiny-3d")).save(folder)
    return folder


def _predict_widget(viewer, folder: Path):
    from embseg.napari._common import FOLDER_CHOICE
    from embseg.napari._predict import PredictWidget

    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.model_choice.value = FOLDER_CHOICE
    widget.model_folder.value = folder
    widget.device.value = "cpu"
    return widget


def _thresholds(model, image: np.ndarray, axes: str) -> tuple[float, float]:
    """Seed and foreground thresholds (2 decimals, as the spin boxes) inside an untrained
    model's narrow seed range, so that its clustering finds objects."""
    _, seeds = model.predict(image, axes=axes, device="cpu", return_seeds=True)
    fg = round(float(np.quantile(seeds, 0.5)), 2)
    seed = max(round(float(np.quantile(seeds, 0.995)), 2), fg + 0.01)
    assert seeds.max() > seed, "seed map too flat for a threshold"
    return seed, fg


def _wait_done(qtbot, widget) -> None:
    # `running` turns False in the handler of the worker's `finished` signal, which the worker
    # emits after `returned` (or `aborted`): their handlers have run by then
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)


# ---------------------------------------------------------------------------------- manifest


def test_manifest_validates() -> None:
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", str(MANIFEST)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_is_registered_and_lists_every_sample() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("embseg")
    assert manifest.name == "embseg"
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == set(list_samples())
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"Predict", "Train"}


def test_commands_resolve() -> None:
    import importlib

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.id


# ---------------------------------------------------------------------------------- sample data


def test_sample_data_loads(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("embseg", "dsb-dense")
    reference = sample("dsb-dense")
    assert [layer.name for layer in viewer.layers] == ["dsb-dense", "dsb-dense mask"]
    image, mask = viewer.layers
    assert isinstance(image, napari.layers.Image)
    assert isinstance(mask, napari.layers.Labels)
    np.testing.assert_array_equal(image.data, reference.image)
    np.testing.assert_array_equal(mask.data, reference.mask)
    assert len(np.unique(mask.data)) - 1 == 53


def test_sample_data_3d_keeps_anisotropy() -> None:
    from embseg.napari._sample_data import qcanet_3d

    (image, image_meta, image_type), (mask, mask_meta, mask_type) = qcanet_3d()
    assert (image_type, mask_type) == ("image", "labels")
    assert image.ndim == 3 and image.shape == mask.shape
    assert image_meta["scale"] == mask_meta["scale"] == (sample("qcanet-3d").anisotropy, 1.0, 1.0)


# ---------------------------------------------------------------------------------- predict


def test_predict_widget_matches_model_predict(make_napari_viewer, qtbot, model_2d: Path) -> None:
    from embseg import load_model

    image = sample("dsb-dense").image
    model = load_model(model_2d)
    seed_thresh, fg_thresh = _thresholds(model, image, "YX")
    expected, seeds = model.predict(image, axes="YX", seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                                    min_size=5, device="cpu", return_seeds=True)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    widget = _predict_widget(viewer, model_2d)
    widget.model_thresholds.value = False
    widget.seed_thresh.value, widget.fg_thresh.value, widget.min_size.value = seed_thresh, fg_thresh, 5
    widget.add_seeds.value = True
    widget.run()
    _wait_done(qtbot, widget)
    assert "nuclei labels" in viewer.layers, widget.status.value
    labels = viewer.layers["nuclei labels"]
    assert isinstance(labels, napari.layers.Labels)
    assert expected.max() > 0, "the oracle found no object: the comparison would be empty"
    np.testing.assert_array_equal(labels.data, expected)
    np.testing.assert_allclose(viewer.layers["nuclei seeds"].data, seeds, atol=1e-6)
    assert widget.status.value == f"{expected.max()} objects"
    assert viewer.dims.ndisplay == 2


def test_predict_widget_object_count_and_thresholds(make_napari_viewer, qtbot, model_2d: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the model's predict replaced by the ground truth, the layer holds the 53 nuclei."""
    reference = sample("dsb-dense")
    calls: list[dict] = []

    def fake_predict(self, image, **kwargs):
        calls.append(kwargs)
        return reference.mask.astype(np.uint32), np.zeros(image.shape, np.float32)

    monkeypatch.setattr(Model, "predict", fake_predict)
    viewer = make_napari_viewer()
    viewer.add_image(reference.image, name="nuclei", scale=(0.5, 0.5))
    widget = _predict_widget(viewer, model_2d)
    widget.tta.value = True
    widget.tile_shape.value = "128"
    widget.run()
    _wait_done(qtbot, widget)
    labels = viewer.layers["nuclei labels"]
    assert len(np.unique(labels.data)) - 1 == 53
    assert tuple(labels.scale) == (0.5, 0.5)
    assert "nuclei seeds" not in viewer.layers
    assert calls == [{"axes": "YX", "tile_shape": 128, "tta": True, "device": "cpu", "return_seeds": True}]
    # the model's own thresholds are shown once it is loaded
    assert widget.seed_thresh.value == pytest.approx(0.9)
    # a second run updates the same layer instead of adding another
    widget.run()
    _wait_done(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["nuclei", "nuclei labels"]


def test_predict_widget_shipped_model_on_a_sample(make_napari_viewer, qtbot) -> None:
    """The shipped nuclei-2d on the dsb-large sample (19 nuclei): about that many objects."""
    from embseg import matching
    from embseg.napari._predict import PredictWidget

    viewer = make_napari_viewer()
    viewer.open_sample("embseg", "dsb-large")
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.image.value = viewer.layers["dsb-large"]
    assert widget.model_choice.value == "nuclei-2d"
    widget.device.value = "cpu"
    widget.run()
    _wait_done(qtbot, widget)
    labels = viewer.layers["dsb-large labels"].data
    truth = viewer.layers["dsb-large mask"].data
    n = len(np.unique(labels)) - 1
    assert abs(n - 19) <= 3, widget.status.value  # 20 with the model of 2026-12
    assert widget.status.value == f"{n} objects"
    assert matching(truth, labels, thresh=0.5).f1 >= 0.85


def test_predict_widget_stack_and_cancel(make_napari_viewer, qtbot, model_2d: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack is segmented plane by plane; Cancel stops at the next plane and adds nothing."""
    import threading

    release = threading.Event()
    seen: list[int] = []

    def slow_predict(self, image, **kwargs):
        seen.append(image.shape[0])
        release.wait(WAIT_S)  # until the test has cancelled
        return np.ones(image.shape, np.uint32), np.zeros(image.shape, np.float32)

    monkeypatch.setattr(Model, "predict", slow_predict)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 32, 40), np.float32), name="movie")
    widget = _predict_widget(viewer, model_2d)
    widget.run()
    qtbot.waitUntil(lambda: len(seen) == 1, timeout=WAIT_MS)
    assert widget.stop_button.enabled and not widget.start_button.enabled
    widget.cancel()
    release.set()
    _wait_done(qtbot, widget)
    assert len(seen) == 1
    assert "movie labels" not in viewer.layers
    assert widget.status.value == "cancelled"
    assert widget.start_button.enabled and not widget.stop_button.enabled

    widget.run()  # without cancelling: every plane, ids unique over the stack
    _wait_done(qtbot, widget)
    labels = viewer.layers["movie labels"].data
    assert labels.shape == (4, 32, 40)
    assert [int(np.unique(plane)[0]) for plane in labels] == [1, 2, 3, 4]
    assert widget.progress.value == widget.progress.max


def test_predict_widget_3d_volume(make_napari_viewer, qtbot, model_3d: Path) -> None:
    from embseg import load_model

    volume = sample("qcanet-3d").image[8:24, 20:84, 20:84]
    model = load_model(model_3d)
    seed_thresh, fg_thresh = _thresholds(model, volume, "ZYX")
    expected = model.predict(volume, axes="ZYX", seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                             min_size=5, device="cpu")
    assert expected.max() > 0
    viewer = make_napari_viewer()
    viewer.add_image(volume, name="embryo", scale=(2.0, 1.0, 1.0))
    widget = _predict_widget(viewer, model_3d)
    widget.model_thresholds.value = False
    widget.seed_thresh.value, widget.fg_thresh.value, widget.min_size.value = seed_thresh, fg_thresh, 5
    widget.run()
    _wait_done(qtbot, widget)
    assert "embryo labels" in viewer.layers, widget.status.value
    np.testing.assert_array_equal(viewer.layers["embryo labels"].data, expected)
    assert tuple(viewer.layers["embryo labels"].scale) == (2.0, 1.0, 1.0)
    assert viewer.dims.ndisplay == 3


def test_predict_widget_reports_errors(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    widget = _predict_widget(viewer, tmp_path)  # an empty folder is no model
    widget.run()
    _wait_done(qtbot, widget)
    assert widget.status.value.startswith("error:")
    assert "config.json" in widget.status.value
    assert "img labels" not in viewer.layers


# ---------------------------------------------------------------------------------- train


def _blobs(shape: tuple[int, int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic image of ``n`` bright discs with their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(16, 36)] = k
    image = (labels > 0).astype(np.float32) + 0.1 * rng.standard_normal(shape).astype(np.float32)
    return image, labels


def _train_widget(viewer, output: Path, epochs: int):
    from embseg.napari._train import TrainWidget

    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.output.value = output
    widget.epochs.value = epochs
    widget.crop_size.value = "32"
    widget.batch_size.value = 2
    widget.samples_per_epoch.value = 4
    widget.val_every.value = 1
    widget.device.value = "cpu"
    return widget


def test_train_widget_two_epochs_from_layers(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    pairs = [_blobs((48, 48), 4, seed) for seed in range(3)]
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([p[0] for p in pairs]), name="frames")
    viewer.add_labels(np.stack([p[1] for p in pairs]), name="annotations")
    out = tmp_path / "run"
    widget = _train_widget(viewer, out, epochs=2)
    widget.start()
    _wait_done(qtbot, widget)
    assert widget.model is not None, widget.status.value
    assert [row["epoch"] for row in widget.rows] == [1, 2]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "last.json").is_file()
    # the live curve shows both epochs
    np.testing.assert_allclose(widget.loss_line.get_ydata(), [row["loss"] for row in widget.rows])
    assert len(widget.ap_line.get_xdata()) == 2
    # the preview is the held-out last frame, segmented by the trained model
    preview = viewer.layers["embseg preview"].data
    assert preview.shape == (48, 48)
    np.testing.assert_array_equal(preview, widget.model.predict(pairs[-1][0], axes="YX", device="cpu"))
    np.testing.assert_array_equal(viewer.layers["embseg preview image"].data, pairs[-1][0])
    assert widget.progress.value == 2
    assert widget.status.value.startswith("done")


def test_train_widget_stop_and_resume(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    import json

    image, labels = _blobs((48, 48), 5, seed=7)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="lab")
    out = tmp_path / "run"
    widget = _train_widget(viewer, out, epochs=500)
    widget.start()
    qtbot.waitUntil(lambda: len(widget.rows) >= 1, timeout=WAIT_MS)
    assert widget.stop_button.enabled
    widget.stop()
    _wait_done(qtbot, widget)
    stopped_at = widget.rows[-1]["epoch"]
    assert stopped_at < 500
    assert json.loads((out / "checkpoints" / "last.json").read_text())["epoch"] == stopped_at
    assert (out / "model.safetensors").is_file()
    assert "embseg preview" in viewer.layers  # a single image previews on itself
    assert viewer.layers["embseg preview"].data.shape == image.shape

    # starting again without resume refuses the non-empty folder
    widget.start()
    assert "resume" in widget.status.value and widget.status.value.startswith("error")

    widget.resume.value = True
    widget.epochs.value = stopped_at + 1
    widget.start()
    _wait_done(qtbot, widget)
    assert widget.rows[-1]["epoch"] == stopped_at + 1, widget.status.value
    assert json.loads((out / "checkpoints" / "last.json").read_text())["epoch"] == stopped_at + 1


def test_train_widget_stop_in_the_first_epoch_leaves_a_model(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    """Stop before the first validation: train validates that epoch, saves and reports a model."""
    import csv

    image, labels = _blobs((48, 48), 5, seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="lab")
    out = tmp_path / "run"
    widget = _train_widget(viewer, out, epochs=500)
    widget.val_every.value = 1000
    widget.start()
    widget.stop()  # before the end of epoch 1: its callback already sees the stop
    _wait_done(qtbot, widget)
    assert widget.model is not None, widget.status.value
    assert (out / "model.safetensors").is_file()
    assert widget.status.value.startswith(f"done: model saved to {out}")
    assert [row["epoch"] for row in widget.rows] == [1]
    assert widget.rows[-1]["val_ap"] is not None  # the score of the stop's validation is shown
    with (out / "log.csv").open() as fh:
        assert [row["val_ap"] != "" for row in csv.DictReader(fh)] == [True]
    assert viewer.layers["embseg preview"].data.shape == image.shape


def test_train_widget_closed_viewer_ends_the_training(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    """Closing the viewer mid-run quits the worker after its epoch, without touching the widget."""
    from superqt.utils import WorkerBase

    image, labels = _blobs((48, 48), 5, seed=4)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="lab")
    out = tmp_path / "run"
    widget = _train_widget(viewer, out, epochs=500)
    worker = widget.start()
    qtbot.waitUntil(lambda: len(widget.rows) >= 1, timeout=WAIT_MS)
    viewer.close()
    qtbot.waitUntil(lambda: not widget._life.alive, timeout=WAIT_MS)  # the dock widget is deleted
    assert worker.abort_requested
    WorkerBase.await_workers(msecs=WAIT_MS)
    assert (out / "model.safetensors").is_file()


def test_train_widget_from_folders(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    import tifffile

    for split, seeds in (("train", (0, 1)), ("val", (2,))):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for seed in seeds:
            image, labels = _blobs((40, 40), 3, seed)
            tifffile.imwrite(tmp_path / split / "images" / f"b{seed}.tif", image)
            tifffile.imwrite(tmp_path / split / "masks" / f"b{seed}.tif", labels)
    viewer = make_napari_viewer()
    widget = _train_widget(viewer, tmp_path / "run", epochs=1)
    widget.source.value = "folders"
    assert widget.image.native.isHidden() and not widget.images_dir.native.isHidden()
    widget.images_dir.value = tmp_path / "train" / "images"
    widget.masks_dir.value = tmp_path / "train" / "masks"
    widget.val_images_dir.value = tmp_path / "val" / "images"
    widget.val_masks_dir.value = tmp_path / "val" / "masks"
    widget.start()
    _wait_done(qtbot, widget)
    assert widget.model is not None, widget.status.value
    preview_image = tifffile.imread(tmp_path / "val" / "images" / "b2.tif")
    np.testing.assert_array_equal(viewer.layers["embseg preview image"].data, preview_image)
    np.testing.assert_array_equal(viewer.layers["embseg preview"].data,
                                  widget.model.predict(preview_image, axes="YX", device="cpu"))


def test_layer_pairs_shapes() -> None:
    from embseg.errors import UserError
    from embseg.napari._train import layer_pairs

    labels = np.zeros((3, 16, 16), np.uint8)
    pairs, axes = layer_pairs(np.zeros((3, 2, 16, 16)), labels, ndim=2)
    assert axes == "CYX" and len(pairs) == 3 and pairs[0][0].shape == (2, 16, 16)
    pairs, axes = layer_pairs(np.zeros((16, 16, 3)), labels[0], ndim=2, rgb=True)
    assert axes == "CYX" and pairs[0][0].shape == (3, 16, 16)
    pairs, axes = layer_pairs(np.zeros((3, 16, 16)), labels, ndim=3)
    assert axes == "ZYX" and len(pairs) == 1
    with pytest.raises(UserError, match="does not fit"):
        layer_pairs(np.zeros((16, 17)), labels[0], ndim=2)
    with pytest.raises(UserError, match="integers"):
        layer_pairs(np.zeros((16, 16)), np.zeros((16, 16), np.float32), ndim=2)


def test_image_layout_and_tile_parsing() -> None:
    from embseg.errors import UserError
    from embseg.napari._common import image_layout, parse_tile_shape

    array, axes, stack = image_layout(np.zeros((5, 16, 16)), ndim=2, in_channels=1)
    assert (array.shape, axes, stack) == ((5, 16, 16), "YX", True)
    array, axes, stack = image_layout(np.zeros((5, 16, 16)), ndim=3, in_channels=1)
    assert (axes, stack) == ("ZYX", False)
    array, axes, stack = image_layout(np.zeros((16, 16, 2, 5)), ndim=2, in_channels=2, axes="YXCT")
    assert (array.shape, axes, stack) == ((5, 16, 16, 2), "YXC", True)
    assert parse_tile_shape("") is None and parse_tile_shape("256") == 256
    assert parse_tile_shape("32, 128x128", ndim=3) == (32, 128, 128)
    with pytest.raises(UserError):
        parse_tile_shape("12,12", ndim=3)
    with pytest.raises(UserError):
        image_layout(np.zeros((16, 16)), ndim=2, in_channels=1, axes="TYX")


def test_napari_import_stays_light() -> None:
    """Importing the plugin's modules (what napari does to build a widget) must not import torch."""
    code = ("import sys, embseg.napari, embseg.napari._sample_data, embseg.napari._common, "
            "embseg.napari._predict, embseg.napari._train; print('torch' in sys.modules)")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
