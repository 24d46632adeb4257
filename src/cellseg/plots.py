"""Figures: training curves (the seed's Figure 2) and more, written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from scipy import ndimage
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cellseg.io import atomic_path  # noqa: E402


def training_curves(history: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Train and validation loss, IoU and Dice per epoch, side by side, as one PNG."""
    epochs = [row["epoch"] for row in history]
    names = [n for n in ("loss", "iou", "dice") if any(f"val/{n}" in row or f"train/{n}" in row for row in history)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}/{name}"
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def compare_curves(histories: dict[str, Sequence[dict[str, float]]], path: Path) -> None:
    """Both models' validation curves per epoch: loss (U-Net) / Dice / competition mAP, one panel each."""
    panels = [k for k in ("val/loss", "val/dice", "val/iou", "val/map") if any(k in r for h in histories.values() for r in h)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name, history in histories.items():
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), "-o", markersize=3, label=name)
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def score_vs_threshold(curves: dict[str, dict[float, float]], path: Path) -> None:
    """Competition score(t) against the IoU threshold t, one line per model."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), "-o", markersize=3, label=name)
    ax.set(xlabel="IoU threshold t", ylabel="TP / (TP + FP + FN)", ylim=(0, 1), title="score(t) on validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def bars_by_cell_type(values: dict[str, dict[str, float]], path: Path, metric: str) -> None:
    """Grouped bars: ``values[model][cell_type]`` of one metric."""
    models = list(values)
    types = sorted({t for per_type in values.values() for t in per_type})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(types), 3.6))
    for k, model in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(types))]
        bars = ax.bar(xs, [values[model].get(t, 0.0) for t in types], width, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(types)), types)
    ax.set(ylabel=metric, ylim=(0, 1), title=f"{metric} per cell type")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    path: Path,
    title: str,
    annotations: Sequence[str] | None = None,
) -> None:
    """The grey image with each instance in its own colour and outline; ``annotations[k]`` is written at
    instance k+1 (e.g. Mask R-CNN's cell type and confidence)."""
    coloured = label2rgb(labels, image=image, alpha=0.35, bg_label=0, image_alpha=1.0)
    coloured[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    fig, ax = plt.subplots(figsize=(image.shape[1] / 70, image.shape[0] / 70))
    ax.imshow(coloured)
    if annotations is not None and labels.max() > 0:
        for k, centre in enumerate(ndimage.center_of_mass(labels > 0, labels, range(1, int(labels.max()) + 1))):
            if k < len(annotations) and not np.isnan(centre[0]):
                ax.text(centre[1], centre[0], annotations[k], fontsize=4, color="white", ha="center", va="center")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
