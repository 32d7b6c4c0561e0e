"""Sample data contributions: the package's sample images with their ground-truth masks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LayerData = tuple[Any, dict[str, Any], str]


def sample_layers(name: str) -> list[LayerData]:
    """The image and its mask of the shipped sample ``name`` as napari layer data.

    Parameters
    ----------
    name
        A name from :func:`embseg.samples.list_samples`.

    Returns
    -------
    list of (data, metadata, layer_type)
        An ``image`` layer and a ``labels`` layer; 3D samples carry their voxel anisotropy as
        the layer scale.
    """
    from embseg.samples import sample

    item = sample(name)
    scale = (item.anisotropy, 1.0, 1.0) if len(item.axes) == 3 else (1.0, 1.0)
    return [
        (item.image, {"name": name, "scale": scale, "metadata": {"description": item.description}}, "image"),
        (item.mask, {"name": f"{name} mask", "scale": scale, "opacity": 0.5}, "labels"),
    ]


def _make(name: str) -> Callable[[], list[LayerData]]:
    def load() -> list[LayerData]:
        return sample_layers(name)

    load.__name__ = name.replace("-", "_")
    load.__doc__ = f"Sample {name!r} (image and mask)."
    return load


# One command per sample (npe2 sample_data commands take no arguments); names match napari.yaml.
dsb_dense = _make("dsb-dense")
dsb_clustered = _make("dsb-clustered")
dsb_large = _make("dsb-large")
qcanet_3d = _make("qcanet-3d")
