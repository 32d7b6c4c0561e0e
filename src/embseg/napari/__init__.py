"""napari plugin for embseg (npe2): a Predict widget, a Train widget and the bundled samples.

The manifest is ``napari.yaml`` in this package, registered by the ``napari.manifest`` entry
point. Nothing heavy is imported here: torch and the model code load only when a widget runs,
so napari starts fast. Install with ``pip install "embseg[napari]"``.
"""

from __future__ import annotations

__all__ = ["PredictWidget", "TrainWidget"]


def __getattr__(name: str) -> object:
    if name == "PredictWidget":
        from embseg.napari._predict import PredictWidget

        return PredictWidget
    if name == "TrainWidget":
        from embseg.napari._train import TrainWidget

        return TrainWidget
    raise AttributeError(f"module 'embseg.napari' has no attribute {name!r}")
