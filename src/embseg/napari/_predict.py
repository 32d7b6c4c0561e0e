"""Predict widget: segment an image layer with a shipped or trained model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    SpinBox,
    create_widget,
)

from embseg.napari._base import WorkerWidget
from embseg.napari._common import (
    FOLDER_CHOICE,
    image_layout,
    parse_tile_shape,
    set_image,
    set_labels,
    shipped_models,
)

if TYPE_CHECKING:
    import napari

DEVICES = ["auto", "cpu", "cuda", "mps"]


class PredictWidget(WorkerWidget):
    """Segment the selected image layer; adds a Labels layer (and optionally the seed map).

    Prediction runs in a napari ``thread_worker``: the viewer stays responsive, the progress bar
    counts planes (a stack is segmented plane by plane), and Cancel stops the run at the next
    plane (the plane being computed finishes first; nothing is added to the viewer).

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Segment", stop_text="Cancel", progress_label="progress")
        self._model_cache: dict[str, tuple[float, Any]] = {}
        self.last_labels: np.ndarray | None = None

        import napari

        self.image = create_widget(annotation=napari.layers.Image, label="image")
        models = shipped_models()
        self.model_choice = ComboBox(label="model", choices=[*models, FOLDER_CHOICE],
                                     value=models[0] if models else FOLDER_CHOICE)
        self.model_folder = FileEdit(mode="d", label="model folder")
        self.axes = LineEdit(label="axes", value="", tooltip="axes of the image, e.g. YX, TYX, CZYX; empty = infer")
        self.tta = CheckBox(text="test-time augmentation (slower, smoother)", value=False)
        self.model_thresholds = CheckBox(text="use the model's tuned thresholds", value=True)
        self.seed_thresh = FloatSpinBox(label="seed threshold", value=0.9, min=0.01, max=0.99, step=0.01)
        self.fg_thresh = FloatSpinBox(label="foreground threshold", value=0.5, min=0.01, max=0.99, step=0.01)
        self.min_size = SpinBox(label="min object size", value=10, min=0, max=10**7)
        self.tile_shape = LineEdit(label="tile shape", value="",
                                   tooltip="empty = automatic (large images are tiled); e.g. 512 or 32,256,256")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.add_seeds = CheckBox(text="add the seed map", value=False)
        self.show_3d = CheckBox(text="show 3D results as a volume", value=True)
        self.extend([self.image, self.model_choice, self.model_folder, self.axes, self.tta,
                     self.model_thresholds, self.seed_thresh, self.fg_thresh, self.min_size,
                     self.tile_shape, self.device, self.add_seeds, self.show_3d, self.start_button,
                     self.stop_button, self.progress, self.status])
        self.model_choice.changed.connect(self._sync_enabled)
        self.model_thresholds.changed.connect(self._sync_enabled)
        self.start_button.changed.connect(self.run)
        self.stop_button.changed.connect(self.cancel)
        self._sync_enabled()

    # ------------------------------------------------------------------------------ state

    def _sync_enabled(self, *_: Any) -> None:
        self.model_folder.visible = self.model_choice.value == FOLDER_CHOICE
        for widget in (self.seed_thresh, self.fg_thresh, self.min_size):
            widget.enabled = not self.model_thresholds.value

    def _model_source(self) -> str:
        from embseg.errors import UserError

        if self.model_choice.value != FOLDER_CHOICE:
            return str(self.model_choice.value)
        folder = Path(self.model_folder.value)
        if str(self.model_folder.value) in ("", ".") or not folder.is_dir():
            raise UserError(f"choose a model folder (a folder with config.json and model.safetensors), got {folder}")
        return str(folder)

    def _load(self, source: str) -> Any:
        """Load a model once per source (reloaded when its weights change on disk)."""
        from embseg import load_model

        weights = Path(source) / "model.safetensors"
        stamp = weights.stat().st_mtime if weights.is_file() else 0.0
        cached = self._model_cache.get(source)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        model = load_model(source)
        self._model_cache[source] = (stamp, model)
        return model

    # ------------------------------------------------------------------------------ actions

    def run(self, *_: Any) -> Any:
        """Start segmenting the selected layer; returns the worker (already started)."""
        from napari.qt.threading import thread_worker

        layer = self.image.value
        if layer is None:
            self._fail("no image layer selected")
            return None
        try:
            source = self._model_source()
            tile_text = self.tile_shape.value
            parse_tile_shape(tile_text)
        except Exception as err:  # UserError: shown, not raised into the event loop
            self._fail(str(err))
            return None
        options = {
            "tta": bool(self.tta.value),
            "device": str(self.device.value),
            "return_seeds": True,
        }
        if not self.model_thresholds.value:
            options.update(seed_thresh=float(self.seed_thresh.value), fg_thresh=float(self.fg_thresh.value),
                           min_size=int(self.min_size.value))
        axes_text = str(self.axes.value)
        data, rgb, name = layer.data, bool(getattr(layer, "rgb", False)), layer.name

        def steps() -> Any:
            model = self._load(source)
            yield ("model", model, 0)
            array, axes, is_stack = image_layout(data, model.ndim, model.config.in_channels, rgb, axes_text)
            tiles = parse_tile_shape(tile_text, model.ndim)
            planes = list(array) if is_stack else [array]
            yield ("planes", None, len(planes))
            labels_out, seeds_out = [], []
            offset = 0
            for i, plane in enumerate(planes):
                labels, seeds = model.predict(plane, axes=axes, tile_shape=tiles, **options)
                labels = labels.astype(np.uint32, copy=True)
                # unique ids over the whole stack, so that each object has its own colour
                labels[labels > 0] += offset
                offset = max(offset, int(labels.max()))
                labels_out.append(labels)
                seeds_out.append(seeds)
                yield ("plane", None, i + 1)
            if is_stack:
                return model, np.stack(labels_out), np.stack(seeds_out)
            return model, labels_out[0], seeds_out[0]

        @thread_worker
        def segment() -> Any:
            from embseg.allocator import release_freed_memory
            from embseg.errors import UserError

            try:
                return (yield from steps())
            except UserError as err:  # a user's mistake: a message, not a traceback
                return ("error", str(err), None)
            finally:
                release_freed_memory()  # the viewer does not keep the job's peak (embseg.allocator)

        worker = segment()
        self.progress.max = 0  # busy until the number of planes is known
        self.progress.value = 0
        self.status.value = f"segmenting {name} ..."
        worker.yielded.connect(self._while_alive(self._on_yielded))
        worker.aborted.connect(self._while_alive(self._on_aborted))
        return self._launch(worker, lambda result: self._on_returned(result, layer))

    def cancel(self, *_: Any) -> None:
        """Stop the running prediction at the next plane."""
        if self.worker is not None:
            self.status.value = "cancelling (after the current plane) ..."
            self.worker.quit()

    # ------------------------------------------------------------------------------ results

    def _on_yielded(self, item: tuple[str, Any, int]) -> None:
        kind, model, count = item
        if kind == "model":
            self.status.value = f"model {model.config.name} loaded ({model.ndim}D)"
            if self.model_thresholds.value:
                self.seed_thresh.value = model.config.seed_thresh
                self.fg_thresh.value = model.config.fg_thresh
                self.min_size.value = model.config.min_size
        elif kind == "planes":
            self.progress.max = count if count > 1 else 0
        elif kind == "plane" and self.progress.max > 0:  # max 0: one image, a busy bar
            self.progress.value = count
            self.status.value = f"segmented {count}/{self.progress.max}"

    def _on_returned(self, result: tuple[Any, Any, Any], layer: Any) -> None:
        model, labels, seeds = result
        if isinstance(model, str):
            self._fail(labels)
            return
        self.last_labels = labels
        self.progress.max = 1
        self.progress.value = 1
        out = set_labels(self._viewer, f"{layer.name} labels", labels, like=layer)
        if self.add_seeds.value:
            set_image(self._viewer, f"{layer.name} seeds", seeds, like=layer, colormap="magma",
                      blending="additive", contrast_limits=(0.0, 1.0))
        if model.ndim == 3 and self.show_3d.value:
            self._viewer.dims.ndisplay = 3
        n = len(np.unique(labels)) - int((labels == 0).any())
        self.status.value = f"{n} objects"
        self._viewer.layers.selection.active = out

    def _on_aborted(self) -> None:
        self.progress.value = 0
        self.status.value = "cancelled"
