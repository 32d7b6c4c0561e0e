"""Helpers shared by the widgets: model names, image layout, layer updates (no torch here)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from embseg.errors import UserError

if TYPE_CHECKING:
    import napari

#: Choice of the model combo box that means "use the folder below".
FOLDER_CHOICE = "model folder..."
#: Stack axis letters: the image is segmented plane by plane along it.
STACK_AXES = "TS"


def shipped_models() -> list[str]:
    """Names of the models shipped in ``embseg/pretrained/`` (read without importing torch)."""
    root = resources.files("embseg") / "pretrained"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def parse_tile_shape(text: str, ndim: int | None = None) -> tuple[int, ...] | int | None:
    """``""`` / ``"auto"`` -> ``None``; ``"256"`` -> ``256``; ``"32,256,256"`` -> a tuple.

    Raises
    ------
    UserError
        Not integers, or (when ``ndim`` is given) the wrong number of values.
    """
    text = text.strip().lower()
    if text in ("", "auto", "none"):
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"tile shape {text!r}: give integers, e.g. 512 or 32,256,256") from None
    if len(values) == 1:
        return values[0]
    if ndim is not None and len(values) != ndim:
        raise UserError(f"tile shape {text!r} has {len(values)} values; the model is {ndim}D")
    return values


def image_layout(data: Any, ndim: int, in_channels: int, rgb: bool = False,
                 axes: str = "") -> tuple[np.ndarray, str, bool]:
    """How to hand a layer's array to a model: ``(array, axes, is_stack)``.

    A stack (axis ``T`` or ``S`` first in ``array``) is segmented plane by plane; ``axes`` then
    describes one plane.

    Parameters
    ----------
    data
        The layer data (numpy or array-like).
    ndim, in_channels
        Of the model.
    rgb
        The layer is RGB(A) (channels last).
    axes
        The user's axes string for ``data`` (e.g. ``"TYX"``, ``"CZYX"``); ``""`` = infer: a
        ``ndim``-D array is one image, one more axis is channels when the model has several
        (first axis, or last for RGB layers) and a stack of images otherwise.
    """
    array = np.asarray(data)
    spatial = "ZYX"[-ndim:]
    axes = axes.strip().upper()
    if not axes:
        if array.ndim == ndim:
            axes = spatial
        elif array.ndim == ndim + 1 and rgb and in_channels > 1:
            axes = spatial + "C"
        elif array.ndim == ndim + 1 and in_channels > 1 and array.shape[0] == in_channels:
            axes = "C" + spatial
        elif array.ndim == ndim + 1:
            axes = "T" + spatial
        elif array.ndim == ndim + 2 and in_channels > 1:
            axes = "TC" + spatial
        else:
            raise UserError(
                f"the image has {array.ndim} axes but the model is {ndim}D with {in_channels} "
                "channel(s); set the axes field (e.g. TYX, CZYX)"
            )
    if len(axes) != array.ndim:
        raise UserError(f"axes {axes!r} do not fit an image with {array.ndim} axes {array.shape}")
    stack = [a for a in axes if a in STACK_AXES]
    if len(stack) > 1:
        raise UserError(f"axes {axes!r}: at most one stack axis (T or S)")
    if stack:
        position = axes.index(stack[0])
        return np.moveaxis(array, position, 0), axes.replace(stack[0], ""), True
    return array, axes, False


def set_labels(viewer: napari.Viewer, name: str, labels: np.ndarray, like: Any = None,
               **kwargs: Any) -> napari.layers.Labels:
    """Update the Labels layer ``name`` in place, or add it (with ``like``'s scale/translate)."""
    return _set_layer(viewer, "Labels", name, labels, like, **kwargs)


def set_image(viewer: napari.Viewer, name: str, image: np.ndarray, like: Any = None,
              **kwargs: Any) -> napari.layers.Image:
    """Update the Image layer ``name`` in place, or add it (with ``like``'s scale/translate)."""
    return _set_layer(viewer, "Image", name, image, like, **kwargs)


def _set_layer(viewer: napari.Viewer, kind: str, name: str, data: np.ndarray, like: Any,
               **kwargs: Any) -> Any:
    geometry = _geometry(like, data.ndim)
    if name in viewer.layers and viewer.layers[name].__class__.__name__ == kind:
        layer = viewer.layers[name]
        if layer.data.shape == data.shape:
            layer.data = data
            for key, value in geometry.items():
                setattr(layer, key, value)
            return layer
        viewer.layers.remove(name)
    add = viewer.add_labels if kind == "Labels" else viewer.add_image
    return add(data, name=name, **geometry, **kwargs)


def _geometry(like: Any, ndim: int) -> dict[str, Any]:
    """The last ``ndim`` entries of ``like``'s scale and translate (a layer), or nothing."""
    if like is None:
        return {}
    scale = tuple(like.scale)[-ndim:]
    translate = tuple(like.translate)[-ndim:]
    if len(scale) != ndim:
        return {}
    return {"scale": scale, "translate": translate}
