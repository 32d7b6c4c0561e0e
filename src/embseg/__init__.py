"""embseg: instance segmentation of cells and nuclei in 2D and 3D by spatial embeddings.

The public API is imported lazily, so ``import embseg`` is cheap (napari starts fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "UserError": "embseg.errors",
    "matching": "embseg.metrics",
    "matching_dataset": "embseg.metrics",
    "read_image": "embseg.io",
    "read_labels": "embseg.io",
    "write_labels": "embseg.io",
    "Model": "embseg.model",
    "load_model": "embseg.model",
    "TrainConfig": "embseg.config",
    "train": "embseg.training",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'embseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
