"""Data sources: each reads its own format into one common :class:`SourceData` form."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd



IMAGE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "file_name",
    "width",
    "height",
    "cell_type",
    "sample_id",
    "plate_time",
    "sample_date",
    "elapsed_timedelta",
    "row",
)
ANNOTATION_COLUMNS: tuple[str, ...] = ("image_id", "row", "annotation")
IMAGE_METADATA: tuple[str, ...] = ("sample_id", "plate_time", "sample_date", "elapsed_timedelta")
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # an image id that is a safe file name (with "." and ".." refused)


@dataclass(frozen=True)
class SourceData:
    """A data set in the common form every source produces.

    ``images`` has one row per image (:data:`IMAGE_COLUMNS`; ``file_name`` is relative to ``root``;
    ``row`` is where the image is first named in ``annotation_file``).
    ``annotations`` has one row per cell (:data:`ANNOTATION_COLUMNS`): its competition RLE string and
    ``row``, the line of ``annotation_file`` it came from, so that errors can point at it.
    """

    root: Path
    annotation_file: Path
    images: pd.DataFrame
    annotations: pd.DataFrame


def listing(items: Sequence[object], shown: int = 10, separator: str = ", ") -> str:
    """The first ``shown`` items joined by ``separator``, with the number left out (for warnings that name what
    a reader dropped)."""
    head = separator.join(map(str, items[:shown]))
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def subset(data: SourceData, limit: int | None, seed: int) -> SourceData:
    """Keep ``limit`` images, stratified by cell type (proportional, deterministic per ``seed``)."""
    if limit is None or limit >= len(data.images):
        return data
    rng = np.random.default_rng(seed)
    images = data.images.iloc[rng.permutation(len(data.images))].copy()
    rank = images.groupby("cell_type", sort=False).cumcount()
    share = images.groupby("cell_type", sort=False)["image_id"].transform("size")
    # Interleave the types in proportion to their counts, so that any prefix is stratified.
    images["_order"] = (rank + 0.5) / share
    chosen = images.sort_values(["_order", "cell_type"], kind="stable").head(limit)["image_id"]
    keep = data.images[data.images["image_id"].isin(chosen)].reset_index(drop=True)
    annotations = data.annotations[data.annotations["image_id"].isin(chosen)].reset_index(drop=True)
    return SourceData(data.root, data.annotation_file, keep, annotations)
