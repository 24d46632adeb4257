"""Figures: training curves (the seed's Figure 2) and more, written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
