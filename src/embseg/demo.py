"""``embseg demo``: segment the bundled sample images with a shipped model and show the result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from embseg.errors import UserError


def run_demo(output: str | Path = "demo_output", model_name: str = "nuclei-2d", tta: bool = False,
             device: str = "auto") -> dict:
    """Predict every 2D sample with ``model_name``; write labels, overlays, a contact sheet, scores.

    Returns
    -------
    dict
        ``{"images": [...], "table": str, "output": Path, "seconds": float}``.
    """
    from embseg.io import write_labels
    from embseg.metrics import matching
    from embseg.model import load_model
    from embseg.plots import contact_sheet, save_overlay
    from embseg.samples import list_samples, sample

    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create output folder ({err.strerror})") from None
    start = time.monotonic()
    model = load_model(model_name)
    thresholds = [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
    rows, panels, records = [], [], []
    gts, preds = [], []
    for name in list_samples(ndim=model.ndim):
        s = sample(name)
        t0 = time.monotonic()
        labels = model.predict(s.image, axes=s.axes, tta=tta, device=device)
        seconds = time.monotonic() - t0
        write_labels(out / f"{name}_labels.tif", labels, overwrite=True)
        save_overlay(s.image, labels, out / f"{name}_overlay.png", title=f"{name}: {int(labels.max())} objects")
        scores = [m.accuracy for m in matching(s.mask, labels, thresh=thresholds)]
        rows.append((name, int(s.mask.max()), int(labels.max()), scores, seconds))
        panels.append((s.image, s.mask, f"{name}: ground truth ({int(s.mask.max())})"))
        panels.append((s.image, labels, f"{name}: embseg ({int(labels.max())})"))
        gts.append(s.mask)
        preds.append(labels)
        records.append({"name": name, "n_true": int(s.mask.max()), "n_pred": int(labels.max()),
                        "ap": dict(zip(thresholds, scores, strict=True)), "seconds": seconds})
    contact_sheet(panels, out / "contact_sheet.png", columns=2)
    header = "sample            GT  pred  " + "  ".join(f"AP@{t:.2f}" for t in thresholds) + "   time"
    lines = [header, "-" * len(header)]
    for name, n_true, n_pred, scores, seconds in rows:
        lines.append(f"{name:<16} {n_true:>3}  {n_pred:>4}  " + "  ".join(f"{v:7.3f}" for v in scores)
                     + f"  {seconds:5.1f}s")
    mean = np.mean([r[3] for r in rows], axis=0)
    lines.append(f"{'mean':<16} {'':>3}  {'':>4}  " + "  ".join(f"{v:7.3f}" for v in mean))
    return {"images": records, "table": "\n".join(lines), "output": out,
            "seconds": time.monotonic() - start, "model": model.source}
