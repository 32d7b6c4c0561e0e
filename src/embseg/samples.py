"""Small real images with masks shipped inside the package (credits in ``sample_data/CREDITS.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embseg.errors import UserError

SAMPLE_DIR = Path(__file__).parent / "sample_data"

#: name -> (file stem, axes, anisotropy z:xy, description)
_SAMPLES = {
    "dsb-dense": ("dsb_4a424e0c", "YX", 1.0, "DSB2018 fluorescence nuclei, 256x256, 53 nuclei"),
    "dsb-clustered": ("dsb_358e47ea", "YX", 1.0, "DSB2018 fluorescence nuclei, 256x256, 52 nuclei"),
    "dsb-large": ("dsb_33618678", "YX", 1.0, "DSB2018 fluorescence nuclei, 360x360, 19 large nuclei"),
    "qcanet-3d": ("qcanet_8cell", "ZYX", 2.18, "mouse embryo nuclei (QCANet), 51x120x122, 8 nuclei"),
}


@dataclass(frozen=True)
class Sample:
    """One sample image with its ground-truth mask."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    axes: str
    anisotropy: float
    description: str
    path: Path


def list_samples(ndim: int | None = None) -> list[str]:
    """Names of the shipped samples (optionally only those with ``ndim`` spatial axes)."""
    return [n for n, (_, axes, _, _) in _SAMPLES.items() if ndim is None or len(axes) == ndim]


def sample(name: str = "dsb-dense") -> Sample:
    """Load a shipped sample by name (see :func:`list_samples`)."""
    import tifffile

    if name not in _SAMPLES:
        from embseg.config import suggest

        raise UserError(f"unknown sample {name!r}{suggest(name, list(_SAMPLES))}; available: {', '.join(_SAMPLES)}")
    stem, axes, anisotropy, description = _SAMPLES[name]
    path = SAMPLE_DIR / f"{stem}.tif"
    image = tifffile.imread(path)
    mask = tifffile.imread(SAMPLE_DIR / f"{stem}_mask.tif")
    return Sample(name, image, mask, axes, anisotropy, description, path)
