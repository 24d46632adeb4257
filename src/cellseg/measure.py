"""Per-cell measurements and per-image summaries of predicted instances (``cellseg predict``'s tables).

Lengths and areas are in pixels of the image as given (before any ``--scale``); intensities in the file's own
units (16-bit values for a 16-bit file; the luminance for colour).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

from cellseg.celltypes import CELL_TYPES, cell_type
from cellseg.instances import Instances

PROPERTIES = (
    "label", "area", "perimeter", "eccentricity", "solidity", "axis_major_length", "axis_minor_length",
    "intensity_mean", "centroid",
)
RENAMED = {"centroid-0": "centroid_y", "centroid-1": "centroid_x"}


def cell_measurements(image_id: str, instances: Instances, grey: np.ndarray) -> pd.DataFrame:
    """One row per cell: scikit-image's ``regionprops_table`` (:data:`PROPERTIES`) of the label image with
    ``grey`` as the intensity image, plus the cell's predicted type and confidence."""
    table = pd.DataFrame(regionprops_table(instances.labels, intensity_image=grey, properties=PROPERTIES))
    table = table.rename(columns=RENAMED)
    index = table["label"].to_numpy() - 1
    table.insert(0, "image", image_id)
    table["cell_type"] = [cell_type(int(c)) for c in instances.classes[index]]
    table["confidence"] = instances.scores[index]
    return table


def image_summary(image_id: str, instances: Instances) -> dict[str, object]:
    """One image's row: its size and predicted cell type, its cells in all and per type, confluence (the
    percentage of pixels inside a cell) and mean cell area (pixels)."""
    labels = instances.labels
    areas = np.bincount(labels.ravel(), minlength=len(instances) + 1)[1:]
    counts = {f"cells_{name}": int((instances.classes == k).sum()) for k, name in enumerate(CELL_TYPES, start=1)}
    return {
        "image": image_id,
        "height": labels.shape[0],
        "width": labels.shape[1],
        "cell_type": instances.image_type,
        "cells": len(instances),
        **counts,
        "confluence_pct": 100.0 * float(areas.sum()) / labels.size,
        "mean_cell_area": float(areas.mean()) if len(areas) else float("nan"),
    }
