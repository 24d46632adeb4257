"""How close the synthetic images come to the real ones: :mod:`cellseg.appearance`'s statistics per cell type.

    python bench/synthetic_realism.py [--real ../shared/sartorius] [--images 60] [--seed 0]
                                      [--out bench/synthetic_realism.json] [--figure docs/synthetic_vs_real.png]

It measures every real image with its annotations, and ``--images`` synthetic images (the generator's own type
order: 60 hold 32 cort, 15 shsy5y and 13 astro) with theirs, then prints a Markdown table per cell type: each
image statistic's median over the type's images and each cell statistic's median (and quartiles) over its
cells, real beside synthetic. ``--figure`` shows a 256² crop of a real and of a synthetic image per type side
by side (same grey scale; the crops with the most cell pixels of the first images of each type).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellseg import io, rle  # noqa: E402
from cellseg.appearance import PROFILE_RANGE, cover_map, measure  # noqa: E402
from cellseg.celltypes import CELL_TYPES  # noqa: E402
from cellseg.io import write_json  # noqa: E402
from cellseg.sources.kaggle import read_kaggle  # noqa: E402
from cellseg.sources.synthetic import synthesize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CROP = 256
# Rows of the table: (statistic, label); image statistics first, then the cells' (median [quartiles]).
ROWS = [
    ("intensity/q05", "grey 5 %"), ("intensity/q50", "grey median"), ("intensity/q95", "grey 95 %"),
    ("intensity/std", "grey std"),
    *((f"profile/{d:+d}", f"border profile {d:+d} px") for d in (-6, -3, -1, 0, 1, 2, 3, 5, 8)),
    ("edge_contrast", "border contrast (grey std within 2 px)"),
    ("spectrum_slope", "power spectrum slope"), ("texture/cells", "high-pass std, cells"),
    ("texture/background", "high-pass std, background"), ("background_dark", "dark outliers, background"),
    ("background_bright", "bright outliers, background"), ("cells", "cells per image"), ("coverage", "cell share of image"),
    ("overlap", "share of cell pixels in 2+ masks"),
]
CELL_ROWS = [("area", "cell area (px)"), ("elongation", "elongation"), ("solidity", "solidity")]


def measure_dataset(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-image and per-cell statistics of a Kaggle-format directory, and the first image of each type with
    its cover map (for the figure)."""
    data = read_kaggle(root)
    images, cells, first = [], [], {}
    by_image = data.annotations.groupby("image_id", sort=False)["annotation"]
    for row in data.images.itertuples():
        grey = io.read_gray(root / row.file_name)
        masks = [rle.pixels(text, grey.shape) for text in by_image.get_group(row.image_id)]
        stats = measure(grey, masks)
        images.append({"image_id": row.image_id, "cell_type": row.cell_type, **stats.image})
        cells.append(stats.cells.assign(cell_type=row.cell_type))
        if row.cell_type not in first:
            first[row.cell_type] = (grey, cover_map(masks, grey.shape) > 0)
    return pd.DataFrame(images), pd.concat(cells, ignore_index=True), first


def summary(images: pd.DataFrame, cells: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per cell type: the image statistics' medians over images, the cell statistics' quartiles over cells."""
    out = {}
    for cell_type in CELL_TYPES:
        own = images[images["cell_type"] == cell_type].drop(columns=["image_id", "cell_type"])
        shapes = cells[cells["cell_type"] == cell_type].drop(columns=["cell_type"])
        row = {key: float(value) for key, value in own.median().items()}
        for key in shapes:
            q25, q50, q75 = np.quantile(shapes[key], (0.25, 0.5, 0.75))
            row |= {key: float(q50), f"{key}/q25": float(q25), f"{key}/q75": float(q75)}
        out[cell_type] = row | {"images": float(len(own))}
    return out


def table(real: dict, synthetic: dict) -> str:
    """Markdown: one row per statistic, real and synthetic per cell type."""
    head = "| statistic | " + " | ".join(f"{t} real | {t} synthetic" for t in CELL_TYPES) + " |"
    lines = [head, "|---" * (1 + 2 * len(CELL_TYPES)) + "|"]
    for key, label in [("images", "images"), *ROWS]:
        lines.append(f"| {label} | " + " | ".join(f"{_fmt(real[t][key])} | {_fmt(synthetic[t][key])}" for t in CELL_TYPES) + " |")
    for key, label in CELL_ROWS:
        cells = [f"{_fmt(s[t][key])} [{_fmt(s[t][key + '/q25'])}–{_fmt(s[t][key + '/q75'])}]" for t in CELL_TYPES for s in (real, synthetic)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.2f}" if magnitude >= 1 else f"{value:.3f}" if magnitude >= 0.01 else f"{value:.4f}"


def densest_crop(cover: np.ndarray) -> tuple[slice, slice]:
    """The CROP² window (on a 32-px grid) holding the most cell pixels."""
    best, where = -1, (0, 0)
    for r in range(0, cover.shape[0] - CROP + 1, 32):
        for c in range(0, cover.shape[1] - CROP + 1, 32):
            count = int(cover[r : r + CROP, c : c + CROP].sum())
            if count > best:
                best, where = count, (r, c)
    return slice(where[0], where[0] + CROP), slice(where[1], where[1] + CROP)


def figure(real: dict, synthetic: dict, path: Path) -> None:
    """One row per cell type: a real crop, its cells' outline, and the same for a synthetic image."""
    fig, axes = plt.subplots(len(CELL_TYPES), 4, figsize=(12, 3.1 * len(CELL_TYPES)))
    for row, cell_type in zip(axes, CELL_TYPES):
        for k, (name, source) in enumerate((("real", real), ("synthetic", synthetic))):
            grey, cover = source[cell_type]
            window = densest_crop(cover)
            row[2 * k].imshow(grey[window], cmap="gray", vmin=80, vmax=180)
            row[2 * k].set_title(f"{cell_type}: {name}")
            row[2 * k + 1].imshow(grey[window], cmap="gray", vmin=80, vmax=180)
            row[2 * k + 1].contour(cover[window], levels=[0.5], colors="#ff8c00", linewidths=0.6)
            row[2 * k + 1].set_title(f"{cell_type}: {name}, annotated cells")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "sartorius")
    parser.add_argument("--images", type=int, default=60, help="synthetic images to generate and measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "synthetic_realism.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "synthetic_vs_real.png")
    args = parser.parse_args()
    began = time.perf_counter()
    real_images, real_cells, real_first = measure_dataset(args.real)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "synthetic", n_images=args.images, seed=args.seed)
        synth_images, synth_cells, synth_first = measure_dataset(Path(tmp) / "synthetic")
    real, synthetic = summary(real_images, real_cells), summary(synth_images, synth_cells)
    figure(real_first, synth_first, args.figure)
    write_json(args.out, {"real": str(args.real), "synthetic": {"images": args.images, "seed": args.seed},
                          "profile_range": [PROFILE_RANGE.start, PROFILE_RANGE.stop],
                          "summary": {"real": real, "synthetic": synthetic},
                          "seconds": time.perf_counter() - began})
    print(table(real, synthetic))
    print(f"\nwrote {args.out} and {args.figure} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
