"""Scoring a folder of predicted label images against a folder of ground truth.

Files pair by name (:func:`embseg.io.pair_folders`). The figures follow
:mod:`embseg.metrics` (StarDist's definitions): AP is ``accuracy = TP / (TP + FP + FN)``,
reported pooled over all objects of the dataset and as the mean over images (the EmbedSeg
paper's convention; an image where both label images are empty scores 0 there, as in StarDist).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embseg.errors import UserError
from embseg.io import atomic_write, pair_folders, read_labels
from embseg.metrics import Matching, default_thresholds, matching, pool

#: The threshold at which F1 and panoptic quality are reported.
REPORT_THRESH = 0.5


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values:
        raise UserError("no IoU thresholds given")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 < t <= 1.0)]
    if bad:
        raise UserError(f"IoU thresholds must lie in (0, 1]; got {', '.join(map(str, bad))}")
    return values


def evaluate_folders(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Score the predicted label images of a folder against the ground truth of another.

    Parameters
    ----------
    gt_dir
        Folder of ground-truth label TIFFs.
    pred_dir
        Folder of predicted label TIFFs, with the same file names (``.tif``/``.tiff``).
    thresholds
        IoU thresholds. Default: :func:`embseg.metrics.default_thresholds` of the first
        ground-truth image's ndim (0.5:0.05:0.9 in 2D, 0.1:0.1:0.9 in 3D).

    Returns
    -------
    dict
        JSON-ready figures: ``thresholds``; ``ap_pooled``, ``ap_per_image`` (mean over images),
        ``tp``, ``fp``, ``fn`` (pooled counts), lists aligned with ``thresholds``;
        ``f1_at_0.5`` and ``pq_at_0.5`` (each ``{"pooled": ..., "per_image": ...}``, computed
        even when 0.5 is not among ``thresholds``); ``n_images``, ``n_true``, ``n_pred``;
        ``per_image``: file stem -> AP list; ``gt_dir``, ``pred_dir``.

    Raises
    ------
    UserError
        Missing or empty folders, files without a partner, unreadable files, labels that are
        not integer images, a pair whose shapes differ, thresholds outside (0, 1].
    """
    pairs = pair_folders(gt_dir, pred_dir, kinds=("ground-truth", "prediction"))
    if thresholds is not None:
        thresholds = _check_thresholds(thresholds)
    computed: list[float] | None = None
    per_image: dict[str, tuple[Matching, ...]] = {}
    for gt_path, pred_path in pairs:
        truth = read_labels(gt_path)
        if thresholds is None:
            thresholds = list(default_thresholds(truth.ndim))
        if computed is None:
            computed = list(thresholds)
            if REPORT_THRESH not in computed:
                computed.append(REPORT_THRESH)
        prediction = read_labels(pred_path, ndim=truth.ndim)
        if prediction.shape != truth.shape:
            raise UserError(
                f"{gt_path} (shape {truth.shape}) and {pred_path} (shape {prediction.shape}) "
                "differ in shape"
            )
        per_image[gt_path.stem] = matching(truth, prediction, computed)
    assert computed is not None and thresholds is not None  # pair_folders never returns []
    columns = list(zip(*per_image.values(), strict=True))
    pooled = [pool(list(column)) for column in columns]
    by_image = [pool(list(column), by_image=True) for column in columns]
    n = len(thresholds)
    at = computed.index(REPORT_THRESH)
    return {
        "gt_dir": str(gt_dir),
        "pred_dir": str(pred_dir),
        "thresholds": thresholds,
        "ap_pooled": [m.accuracy for m in pooled[:n]],
        "ap_per_image": [m.accuracy for m in by_image[:n]],
        "tp": [m.tp for m in pooled[:n]],
        "fp": [m.fp for m in pooled[:n]],
        "fn": [m.fn for m in pooled[:n]],
        "f1_at_0.5": {"pooled": pooled[at].f1, "per_image": by_image[at].f1},
        "pq_at_0.5": {
            "pooled": pooled[at].panoptic_quality,
            "per_image": by_image[at].panoptic_quality,
        },
        "n_images": len(per_image),
        "n_true": pooled[0].n_true,
        "n_pred": pooled[0].n_pred,
        "per_image": {name: [m.accuracy for m in stats[:n]] for name, stats in per_image.items()},
    }


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate_folders` result.

    One row per threshold (threshold, AP pooled, AP mean over images, TP, FP, FN), then F1 and
    panoptic quality at IoU 0.5.
    """
    counts = [*result["tp"], *result["fp"], *result["fn"]]
    width = max(4, *(len(str(c)) for c in counts))
    header = (
        f"{'IoU':>5}  {'AP pooled':>9}  {'AP mean/image':>13}  "
        f"{'TP':>{width}}  {'FP':>{width}}  {'FN':>{width}}"
    )
    lines = [
        f"{result['n_images']} images: {result['n_true']} ground-truth objects, "
        f"{result['n_pred']} predicted objects",
        header,
    ]
    rows = zip(
        result["thresholds"],
        result["ap_pooled"],
        result["ap_per_image"],
        result["tp"],
        result["fp"],
        result["fn"],
        strict=True,
    )
    for thresh, ap, ap_image, tp, fp, fn in rows:
        lines.append(
            f"{thresh:>5.2f}  {ap:>9.3f}  {ap_image:>13.3f}  "
            f"{tp:>{width}}  {fp:>{width}}  {fn:>{width}}"
        )
    for name, key in (("F1", "f1_at_0.5"), ("PQ", "pq_at_0.5")):
        value = result[key]
        lines.append(
            f"{name} at IoU 0.5: {value['pooled']:.3f} pooled, {value['per_image']:.3f} mean/image"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an :func:`evaluate_folders` result as JSON, atomically.

    Raises
    ------
    UserError
        If ``path`` exists and ``overwrite`` is False.
    """
    text = json.dumps(result, indent=2) + "\n"
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
