"""Choice of the clustering thresholds on a validation set, from cached raw network outputs.

The network runs once per image; every threshold pair only re-clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embseg.config import ModelConfig

SEED_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
FG_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)


def score_thresholds(raws: Sequence[torch.Tensor], masks: Sequence[np.ndarray], model_config: ModelConfig,
                     seed_thresh: float, fg_thresh: float) -> tuple[float, float]:
    """Mean per-image AP at IoU 0.5 and 0.75 of the clustering with these thresholds."""
    from embseg.cluster import cluster
    from embseg.metrics import matching

    ap50, ap75 = [], []
    for raw, mask in zip(raws, masks, strict=True):
        labels = cluster(raw, model_config.grid_step, seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                         min_size=model_config.min_size)
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
) -> dict[str, Any]:
    """Grid search of ``seed_thresh`` x ``fg_thresh`` maximising mean AP@0.5 (ties: AP@0.75).

    Pairs with ``seed_thresh < fg_thresh`` are skipped (a seed must be foreground).

    Returns
    -------
    dict
        ``seed_thresh``, ``fg_thresh``, ``ap`` (AP@0.5), ``ap75`` and ``table`` (every trial).
    """
    table = []
    best: dict[str, Any] | None = None
    for fg in fg_grid:
        for seed in seed_grid:
            if seed < fg:
                continue
            ap, ap75 = score_thresholds(raws, masks, model_config, seed, fg)
            table.append({"seed_thresh": seed, "fg_thresh": fg, "ap": ap, "ap75": ap75})
            if best is None or (ap, ap75) > (best["ap"], best["ap75"]):
                best = {"seed_thresh": seed, "fg_thresh": fg, "ap": ap, "ap75": ap75}
    assert best is not None
    return {**best, "table": table}
