"""Train widget: train a model from image/label layers or folders, with a live loss curve."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    RadioButtons,
    SpinBox,
    create_widget,
)

from embseg.errors import UserError
from embseg.napari._base import WorkerWidget
from embseg.napari._common import set_image, set_labels

if TYPE_CHECKING:
    import napari

LAYERS, FOLDERS = "layers", "folders"
PREVIEW_LABELS = "embseg preview"
PREVIEW_IMAGE = "embseg preview image"


def layer_pairs(image: Any, labels: Any, ndim: int, rgb: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Split an image layer and a labels layer into training pairs.

    Parameters
    ----------
    image, labels
        Layer data. ``labels`` is ``ndim``-D (one image) or has one more leading axis (a stack
        of images, e.g. annotated time points). ``image`` has the shape of ``labels``, or one
        more axis for channels: after the stack axis, or last for RGB layers.
    ndim
        Spatial dimensions of the model (2 or 3).
    rgb
        The image layer is RGB (channels last).

    Returns
    -------
    pairs : list of (image, mask)
        Images channel-first when they have channels.
    axes : str
        Axes of each image (``"YX"``, ``"CYX"``, ``"ZYX"``, ``"CZYX"``).
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise UserError(f"the labels layer must hold integers, got {labels.dtype}")
    if labels.ndim not in (ndim, ndim + 1):
        raise UserError(f"a {ndim}D model needs {ndim}D labels (or a stack of them); got shape {labels.shape}")
    stacked = labels.ndim == ndim + 1
    spatial = "ZYX"[-ndim:]
    if rgb and image.shape[:-1] == labels.shape:
        image = np.moveaxis(image, -1, 1 if stacked else 0)
    if image.shape == labels.shape:
        axes = spatial
    elif image.ndim == labels.ndim + 1 and image.shape[int(stacked) + 1:] == labels.shape[int(stacked):] and (
            not stacked or image.shape[0] == labels.shape[0]):
        axes = "C" + spatial
    else:
        raise UserError(f"image shape {image.shape} does not fit labels shape {labels.shape}")
    if stacked:
        return [(image[i], labels[i]) for i in range(labels.shape[0])], axes
    return [(image, labels)], axes


def write_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], images_dir: Path, masks_dir: Path) -> None:
    """Write pairs as ``image_NNNN.tif`` into the two folders (created)."""
    import tifffile

    from embseg import write_labels

    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(pairs):
        tifffile.imwrite(images_dir / f"image_{i:04d}.tif", image)
        write_labels(masks_dir / f"image_{i:04d}.tif", mask, overwrite=True)


def _crop_size(text: str) -> list[int] | None:
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    try:
        return [int(v) for v in text.replace("x", ",").replace(" ", ",").split(",") if v]
    except ValueError:
        raise UserError(f"crop size {text!r}: give integers (multiples of 8), e.g. 96 or 32,96,96") from None


class TrainWidget(WorkerWidget):
    """Train an embseg model from layers or folders; shows the loss and a validation preview.

    Training runs in a napari ``thread_worker``. After every epoch the loss curve and the
    progress bar update; after every validation the current best model segments the validation
    image into the ``embseg preview`` Labels layer. Stop ends training after the current epoch,
    keeping the checkpoint and the best model (a stop before the first validation validates
    that epoch, so a stopped run always leaves a model); tick *resume* to continue a stopped run.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Train", stop_text="Stop", progress_label="epochs")
        import napari
        from qtpy.QtCore import QObject, Signal

        class _Relay(QObject):
            """Carries per-epoch results from the training thread to the GUI thread."""

            row = Signal(object)
            preview = Signal(object)

        self._relay = _Relay()
        self._stop = threading.Event()
        self.rows: list[dict[str, Any]] = []
        self.model: Any = None
        self._preview_like: Any = None

        self.source = RadioButtons(label="training data", choices=[LAYERS, FOLDERS], value=LAYERS,
                                   orientation="horizontal")
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.labels = create_widget(annotation=napari.layers.Labels, label="labels")
        self.images_dir = FileEdit(mode="d", label="images folder")
        self.masks_dir = FileEdit(mode="d", label="masks folder")
        self.val_images_dir = FileEdit(mode="d", label="validation images (optional)")
        self.val_masks_dir = FileEdit(mode="d", label="validation masks (optional)")
        self.ndim = ComboBox(label="dimensions", choices=[2, 3], value=2)
        self.anisotropy = FloatSpinBox(label="anisotropy (z/xy)", value=1.0, min=0.01, max=100.0, step=0.1)
        self.epochs = SpinBox(label="epochs", value=50, min=1, max=100_000)
        self.crop_size = LineEdit(label="crop size", value="", tooltip="empty = from the object sizes; e.g. 96")
        self.batch_size = SpinBox(label="batch size", value=8, min=1, max=1024)
        self.samples_per_epoch = SpinBox(label="crops per epoch", value=400, min=1, max=10**7)
        self.val_every = SpinBox(label="validate every (epochs)", value=2, min=1, max=10_000)
        self.output = FileEdit(mode="d", label="output folder")
        self.resume = CheckBox(text="resume the run in the output folder", value=False)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.extend([self.source, self.image, self.labels, self.images_dir, self.masks_dir,
                     self.val_images_dir, self.val_masks_dir, self.ndim, self.anisotropy, self.epochs,
                     self.crop_size, self.batch_size, self.samples_per_epoch, self.val_every, self.output,
                     self.resume, self.device, self.start_button, self.stop_button, self.progress,
                     self.status])
        self._build_plot()
        self.source.changed.connect(self._sync_visible)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self._relay.row.connect(self._while_alive(self._on_row))
        self._relay.preview.connect(self._while_alive(self._on_preview))
        self._sync_visible()

    # ------------------------------------------------------------------------------ layout

    def _build_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.axes_loss = figure.add_subplot(111)
        self.axes_loss.set_xlabel("epoch")
        self.axes_loss.set_ylabel("loss")
        self.axes_ap = self.axes_loss.twinx()
        self.axes_ap.set_ylabel("val AP@0.5")
        self.axes_ap.set_ylim(0, 1)
        (self.loss_line,) = self.axes_loss.plot([], [], "-o", color="C0", markersize=3, label="loss")
        (self.ap_line,) = self.axes_ap.plot([], [], "s--", color="C1", markersize=4, label="val AP")
        self.canvas = FigureCanvasQTAgg(figure)
        self.canvas.setMinimumHeight(200)
        self.native.layout().addWidget(self.canvas)

    def _sync_visible(self, *_: Any) -> None:
        layers = self.source.value == LAYERS
        for widget in (self.image, self.labels):
            widget.visible = layers
        for widget in (self.images_dir, self.masks_dir, self.val_images_dir, self.val_masks_dir):
            widget.visible = not layers

    # ------------------------------------------------------------------------------ config

    def _config(self, data_dir: Path) -> tuple[Any, tuple[np.ndarray, str] | None, Any]:
        """The TrainConfig, the preview image with its axes, and the layer it overlays."""
        from embseg import TrainConfig, read_image

        output = str(self.output.value)
        if output in ("", "."):
            raise UserError("choose an output folder")
        out = Path(output).expanduser()
        if out.is_dir() and any(out.iterdir()) and not self.resume.value:
            raise UserError(f"{out}: output folder is not empty; tick 'resume' to continue its run, "
                            "or choose an empty folder")
        ndim = int(self.ndim.value)
        config = TrainConfig(output=str(out), ndim=ndim, anisotropy=float(self.anisotropy.value),
                             epochs=int(self.epochs.value), crop_size=_crop_size(self.crop_size.value),
                             batch_size=int(self.batch_size.value),
                             samples_per_epoch=int(self.samples_per_epoch.value),
                             val_every=int(self.val_every.value), device=str(self.device.value))
        preview: tuple[np.ndarray, str] | None
        like = None
        if self.source.value == LAYERS:
            image_layer, labels_layer = self.image.value, self.labels.value
            if image_layer is None or labels_layer is None:
                raise UserError("choose an image layer and a labels layer")
            pairs, axes = layer_pairs(image_layer.data, labels_layer.data, ndim,
                                      bool(getattr(image_layer, "rgb", False)))
            # the last image of a stack is held out for validation; a single image validates itself
            train_pairs, val_pairs = (pairs[:-1], pairs[-1:]) if len(pairs) > 1 else (pairs, [])
            write_pairs(train_pairs, data_dir / "images", data_dir / "masks")
            config.images, config.masks = str(data_dir / "images"), str(data_dir / "masks")
            if val_pairs:
                write_pairs(val_pairs, data_dir / "val_images", data_dir / "val_masks")
                config.val_images, config.val_masks = str(data_dir / "val_images"), str(data_dir / "val_masks")
            config.axes = axes
            preview = (pairs[-1][0], axes)
            like = image_layer if len(pairs) == 1 else None
        else:
            for widget in (self.images_dir, self.masks_dir):
                if str(widget.value) in ("", ".") or not Path(widget.value).is_dir():
                    raise UserError(f"choose the {widget.label} (got {widget.value})")
            config.images, config.masks = str(self.images_dir.value), str(self.masks_dir.value)
            val = [str(w.value) for w in (self.val_images_dir, self.val_masks_dir)]
            if all(v not in ("", ".") for v in val):
                config.val_images, config.val_masks = val
            first = sorted(p for p in Path(config.val_images or config.images).iterdir()
                           if p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith("."))
            preview = read_image(first[0], ndim=ndim) if first else None
        return config, preview, like

    # ------------------------------------------------------------------------------ actions

    def start(self, *_: Any) -> Any:
        """Start (or resume) training; returns the worker (already started)."""
        from napari.qt.threading import thread_worker

        data_dir = Path(tempfile.mkdtemp(prefix="embseg-napari-"))
        try:
            config, preview, like = self._config(data_dir)
        except Exception as err:  # UserError and bad layer data: shown, not raised
            shutil.rmtree(data_dir, ignore_errors=True)
            self._fail(str(err))
            return None
        self._stop.clear()
        resume = bool(self.resume.value)
        if not resume:
            self.rows = []
            self._redraw()
        self._preview_like = like
        if preview is not None and like is None:
            set_image(self._viewer, PREVIEW_IMAGE, preview[0] if preview[1][0] != "C" else preview[0][0])
        relay, stop, life = self._relay, self._stop, self._life
        out = Path(config.output)
        # the last row the callback saw, and whether it had a validation score then
        last: dict[str, Any] = {"row": None, "scored": False}

        def predict_preview(model: Any) -> np.ndarray | None:
            if preview is None or life.quitting():
                return None
            return model.predict(preview[0], axes=preview[1], device=config.device)

        def emit(signal: Any, value: Any) -> None:
            if life.alive:
                try:
                    signal.emit(value)
                except RuntimeError:  # the widget was deleted since the check
                    pass

        def callback(row: dict[str, Any]) -> bool:
            last.update(row=row, scored="val_ap" in row)
            emit(relay.row, dict(row))
            if "val_ap" in row and (out / "model.safetensors").is_file() and preview is not None:
                from embseg import load_model

                emit(relay.preview, predict_preview(load_model(out)))
            # quitting: the widget was deleted or napari quits (it waits for its workers)
            return stop.is_set() or life.quitting()

        def resend_validated_row() -> None:
            # a stop before the first validation validates that epoch after the callback has
            # seen its row (train adds the score to the same row): show the score too
            row = last["row"]
            if row is not None and not last["scored"] and "val_ap" in row:
                emit(relay.row, dict(row))

        @thread_worker
        def run() -> Any:
            from embseg.allocator import release_freed_memory
            from embseg.training import train

            try:
                model = train(config, resume=resume, progress=False, callback=callback)
                resend_validated_row()
                return model, predict_preview(model)
            except UserError as err:  # a user's mistake: a message, not a traceback
                return str(err), None
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
                release_freed_memory()  # the viewer does not keep the job's peak (embseg.allocator)

        self.progress.max = config.epochs
        self.progress.value = self.rows[-1]["epoch"] if self.rows else 0
        self.status.value = "reading the data ..."
        return self._launch(run(), self._on_returned)

    def stop(self, *_: Any) -> None:
        """Stop after the current epoch; the checkpoint and the best model are kept (a stop before
        the first validation validates that epoch, so there is always a model)."""
        self._stop.set()
        self.status.value = "stopping after this epoch ..."

    # ------------------------------------------------------------------------------ updates

    def _on_row(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self.progress.value = min(int(row["epoch"]), self.progress.max)
        ap = f", val AP@0.5 {row['val_ap']:.3f}" if row.get("val_ap") is not None else ""
        self.status.value = f"epoch {row['epoch']}: loss {row['loss']:.4f}{ap}"
        self._redraw()

    def _redraw(self) -> None:
        epochs = [r["epoch"] for r in self.rows]
        self.loss_line.set_data(epochs, [r["loss"] for r in self.rows])
        val = [r for r in self.rows if r.get("val_ap") is not None]
        self.ap_line.set_data([r["epoch"] for r in val], [r["val_ap"] for r in val])
        self.axes_loss.relim()
        self.axes_loss.autoscale_view()
        if epochs:
            self.axes_loss.set_xlim(0.5, max(epochs) + 0.5)
        self.canvas.draw_idle()

    def _on_preview(self, labels: np.ndarray | None) -> None:
        if labels is not None:
            set_labels(self._viewer, PREVIEW_LABELS, labels, like=self._preview_like)

    def _on_returned(self, result: tuple[Any, np.ndarray | None]) -> None:
        if isinstance(result[0], str):
            self._fail(result[0])
            return
        self.model, labels = result
        self._on_preview(labels)
        cfg = self.model.config
        self.status.value = (f"done: model saved to {self.model.source} (seed threshold {cfg.seed_thresh:.2f}, "
                             f"foreground threshold {cfg.fg_thresh:.2f})")
