"""Figures: training curves, label overlays, contact sheets (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    from embseg.io import atomic_write

    with atomic_write(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss terms and validation AP per epoch, from the rows of ``log.csv``."""
    plt = _pyplot()

    def col(name: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            if r.get(name) not in (None, ""):
                xs.append(float(r["epoch"]))
                ys.append(float(r[name]))
        return xs, ys

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    for name in ("loss", "instance", "variance", "seed"):
        xs, ys = col(name)
        if xs:
            ax1.plot(xs, ys, label=name)
    ax1.set_xlabel("epoch")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("training loss")
    xs, ys = col("val_ap")
    ax2.plot(xs, ys, "o-")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation AP@0.5")
    _save(fig, Path(path))
    plt.close(fig)


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n + 1, 3)`` random bright colours, row 0 black (background)."""
    rng = np.random.default_rng(seed)
    colors = rng.uniform(0.25, 1.0, size=(n + 1, 3))
    colors[0] = 0
    return colors


def outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean map of pixels on the border of their object (2D)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    for axis in range(lab.ndim):
        a = np.swapaxes(lab, 0, axis)
        e = np.swapaxes(edge, 0, axis)
        diff = a[1:] != a[:-1]
        e[1:] |= diff & (a[1:] > 0)
        e[:-1] |= diff & (a[:-1] > 0)
    return edge


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB float image: the grey image with each object's outline in its own colour."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:  # channel-first: show the first channel
        img = img[0]
    lo, hi = np.percentile(img, (1, 99.8)) if img.size else (0, 1)
    grey = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lab = np.asarray(labels)
    colors = label_colors(int(lab.max()) if lab.size else 0)
    edge = outlines(lab)
    rgb[edge] = colors[lab[edge]]
    return rgb


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str | Path, title: str | None = None) -> None:
    """Write an overlay PNG (image + coloured instance outlines)."""
    plt = _pyplot()
    rgb = overlay(image, labels)
    h, w = rgb.shape[:2]
    fig = plt.figure(figsize=(max(w, 64) / 100, max(h, 64) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.text(4, 12, title, color="yellow", fontsize=8, va="top")
    _save(fig, Path(path))
    plt.close(fig)


def contact_sheet(panels: Sequence[tuple[np.ndarray, np.ndarray, str]], path: str | Path, columns: int = 3) -> None:
    """A grid of overlays ``(image, labels, title)`` in one PNG."""
    plt = _pyplot()
    n = len(panels)
    columns = max(1, min(columns, n))
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (image, labels, title) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(overlay(image, labels), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
