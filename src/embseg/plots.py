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


def _object_embeddings(raw: Any, labels: np.ndarray, step: Sequence[float], n_objects: int, n_pixels: int,
                       seed: int) -> list[dict[str, np.ndarray]]:
    """For a few objects: sampled pixel embeddings, the seed pixel's centre and 0.5-level radii (pixels)."""
    import torch

    from embseg.embedding import bandwidth, embeddings, membership_radius, split_raw

    ndim = labels.ndim
    raw = torch.as_tensor(raw, dtype=torch.float32)
    offsets, sigmas, seed_logit = split_raw(raw, ndim)
    emb = embeddings(offsets, step).numpy()
    sig = sigmas.numpy()
    seediness = torch.sigmoid(seed_logit).numpy()
    steps = np.asarray(step, dtype=np.float64).reshape((ndim,) + (1,) * 0)
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) > n_objects:
        sizes = np.bincount(labels.ravel())[ids]
        ids = ids[np.argsort(-sizes)][: 3 * n_objects]
        ids = rng.choice(ids, n_objects, replace=False)
    out = []
    for i in ids:
        where = np.flatnonzero(labels.ravel() == i)
        pick = rng.choice(where, min(n_pixels, len(where)), replace=False)
        centre_pixel = where[np.argmax(seediness.ravel()[where])]
        e = emb.reshape(ndim, -1)
        s = bandwidth(torch.as_tensor(sig.reshape(ndim, -1)[:, centre_pixel])).numpy()
        out.append({
            "pixels": np.stack(np.unravel_index(pick, labels.shape)),
            "embedding": e[:, pick] / steps[:, None],
            "centre": e[:, centre_pixel] / steps,
            "radius": np.asarray(membership_radius(torch.as_tensor(s))) / steps,
            "id": int(i),
        })
    return out


def explain_figure(image: np.ndarray, raw: Any, labels: np.ndarray, step: Sequence[float], path: str | Path,
                   mask: np.ndarray | None = None, n_objects: int = 6, n_pixels: int = 40, seed: int = 0) -> None:
    """The method made visible (the paper's Fig. 1): image, ground truth, prediction, and for a few
    objects the learnt embeddings of sampled pixels (dots, arrows from the pixel) inside the
    ``phi = 0.5`` ellipse of the seed pixel's bandwidth around its centre.

    3D: a row for the middle slice and a row for the maximum projection (Y, X components).
    """
    from matplotlib.patches import Ellipse

    plt = _pyplot()
    img = np.asarray(image, dtype=np.float32)
    ndim = labels.ndim
    if img.ndim == ndim + 1:
        img = img[0]
    objects = _object_embeddings(raw, labels, step, n_objects, n_pixels, seed)
    views: list[tuple[str, Any]] = []
    if ndim == 2:
        views.append(("", lambda a: a))
    else:
        z = labels.shape[0] // 2
        views.append((f" (slice z={z})", lambda a, z=z: a[z]))
        views.append((" (max projection)", lambda a: a.max(0)))
    n_cols = 4 if mask is not None else 3
    fig, axes = plt.subplots(len(views), n_cols, figsize=(4 * n_cols, 4 * len(views)), dpi=100, squeeze=False)
    colors = label_colors(len(objects), seed=seed + 1)[1:]
    for row, (suffix, view) in enumerate(views):
        col = 0
        base = view(img)
        axes[row, col].imshow(base, cmap="gray")
        axes[row, col].set_title("image" + suffix)
        col += 1
        if mask is not None:
            axes[row, col].imshow(overlay(base, view(np.asarray(mask))))
            axes[row, col].set_title(f"ground truth ({int(np.asarray(mask).max())})" + suffix)
            col += 1
        axes[row, col].imshow(overlay(base, view(labels)))
        axes[row, col].set_title(f"prediction ({int(labels.max())})" + suffix)
        col += 1
        ax = axes[row, col]
        ax.imshow(base, cmap="gray")
        for color, obj in zip(colors, objects, strict=False):
            py, px = obj["pixels"][-2], obj["pixels"][-1]
            ey, ex = obj["embedding"][-2], obj["embedding"][-1]
            if ndim == 3 and row == 0:
                keep = obj["pixels"][0] == labels.shape[0] // 2
                py, px, ey, ex = py[keep], px[keep], ey[keep], ex[keep]
            ax.plot(px, py, ".", color=color, markersize=2, alpha=0.6)
            ax.plot(ex, ey, "o", color=color, markersize=3, markeredgecolor="k", markeredgewidth=0.3)
            cy, cx = obj["centre"][-2], obj["centre"][-1]
            ry, rx = obj["radius"][-2], obj["radius"][-1]
            ax.add_patch(Ellipse((cx, cy), 2 * rx, 2 * ry, fill=False, color=color, linewidth=1.2))
            ax.plot(cx, cy, "+", color=color, markersize=8)
        ax.set_xlim(-0.5, base.shape[-1] - 0.5)
        ax.set_ylim(base.shape[-2] - 0.5, -0.5)
        ax.set_title("pixel embeddings and 0.5-level ellipses" + suffix)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
