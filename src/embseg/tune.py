"""Choice of the clustering thresholds on a validation set, from cached raw network outputs.

The network runs once per image; every threshold pair (and minimum object size) only
re-clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embseg.config import ModelConfig

SEED_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
FG_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Minimum object sizes tried, as multiples of the model's own (the data rule's) ``min_size``.
MIN_SIZE_FACTORS = (1.0, 1.5, 2.0)


def min_size_grid(min_size: int, factors: Sequence[float] = MIN_SIZE_FACTORS) -> tuple[int, ...]:
    """The distinct ``round(min_size * f)`` for the ``factors``, ascending."""
    return tuple(sorted({round(min_size * f) for f in factors}))


def score_thresholds(raws: Sequence[torch.Tensor], masks: Sequence[np.ndarray], model_config: ModelConfig,
                     seed_thresh: float, fg_thresh: float, min_size: int | None = None) -> tuple[float, float]:
    """Mean per-image AP at IoU 0.5 and 0.75 of the clustering with these thresholds."""
    from embseg.cluster import cluster
    from embseg.metrics import matching

    ap50, ap75 = [], []
    for raw, mask in zip(raws, masks, strict=True):
        labels = cluster(raw, model_config.grid_step, seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                         min_size=model_config.min_size if min_size is None else min_size,
                         max_radius=model_config.seed_radius())
        m50, m75 = matching(mask, labels, thresh=(0.5, 0.75))
        ap50.append(m50.accuracy)
        ap75.append(m75.accuracy)
    return float(np.mean(ap50)), float(np.mean(ap75))


def tune_thresholds(
    raws: Sequence[torch.Tensor],
    masks: Sequence[np.ndarray],
    model_config: ModelConfig,
    seed_grid: Sequence[float] = SEED_GRID,
    fg_grid: Sequence[float] = FG_GRID,
    size_grid: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Grid search of ``seed_thresh`` x ``fg_thresh`` (x ``min_size``) maximising mean AP@0.5
    (ties: AP@0.75, then the smaller ``min_size``).

    Pairs with ``seed_thresh < fg_thresh`` are skipped (a seed must be foreground).
    ``size_grid`` defaults to the model's ``min_size`` alone.

    Returns
    -------
    dict
        ``seed_thresh``, ``fg_thresh``, ``min_size``, ``ap`` (AP@0.5), ``ap75`` and ``table``
        (every trial).
    """
    sizes = (model_config.min_size,) if size_grid is None else tuple(size_grid)
    table = []
    best: dict[str, Any] | None = None
    for size in sizes:
        for fg in fg_grid:
            for seed in seed_grid:
                if seed < fg:
                    continue
                ap, ap75 = score_thresholds(raws, masks, model_config, seed, fg, size)
                row = {"seed_thresh": seed, "fg_thresh": fg, "min_size": int(size), "ap": ap, "ap75": ap75}
                table.append(row)
                if best is None or (ap, ap75) > (best["ap"], best["ap75"]):
                    best = dict(row)
    assert best is not None
    return {**best, "table": table}


def tune_model(model: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], device: str = "auto",
               tta: bool = False, normalized: bool = False, axes: Sequence[str | None] | None = None,
               sources: Sequence[str] | None = None) -> dict[str, Any]:
    """Tune ``model``'s thresholds on images and masks and store them in its config.

    Parameters
    ----------
    model
        An :class:`embseg.model.Model`; its ``config`` is updated in place: ``seed_thresh`` and
        ``fg_thresh``, and ``min_size`` too when the data rule chose it in training (from
        :func:`min_size_grid` of that size, ``config.training["base_min_size"]``); or
        ``tta_seed_thresh`` / ``tta_fg_thresh`` at the model's ``min_size`` when ``tta``.
    images, masks
        The validation set.
    device
        Where the network runs.
    tta
        Tune for predictions with test-time augmentation.
    normalized
        The images are already normalised (channel-first), as in training.
    axes, sources
        Per-image axes and names (for error messages), when not ``normalized``.

    Returns
    -------
    dict
        :func:`tune_thresholds`'s result plus ``tta`` and ``n_images``.
    """
    raws = []
    for i, image in enumerate(images):
        raws.append(model.predict_raw(image, axes=None if axes is None else axes[i], tta=tta, device=device,
                                      normalized=normalized, source="image" if sources is None else sources[i]))
    base = model.config.training.get("base_min_size")  # set when the data rule chose min_size
    size_grid = None if tta or base is None else min_size_grid(int(base))
    best = tune_thresholds(raws, masks, model.config, size_grid=size_grid)
    best["tta"] = bool(tta)
    best["n_images"] = len(raws)
    if tta:
        model.config.tta_seed_thresh = best["seed_thresh"]
        model.config.tta_fg_thresh = best["fg_thresh"]
    else:
        model.config.seed_thresh = best["seed_thresh"]
        model.config.fg_thresh = best["fg_thresh"]
        model.config.min_size = int(best["min_size"])
    return best

