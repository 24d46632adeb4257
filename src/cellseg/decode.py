"""Decode every image's RLE rows into an instance label image plus image and instance tables.

Overlap rule: real annotations overlap a little. A pixel claimed by several instances goes to the
SMALLEST of them (ties: the one listed first), so that a small cell lying on a large one keeps its
shape; the pixels an instance loses are counted in ``instances.overlap_lost``. Each instance keeps its
own full RLE (``instances.annotation``), so nothing is lost for the COCO conversion.

Outputs, in one directory written atomically:
``labels/<image_id>.png`` (uint16, 0 = background, label k = the image's k-th annotation),
``images.parquet`` (one row per image) and ``instances.parquet`` (one row per instance).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellseg import rle
from cellseg.errors import DataError
from cellseg.instances import MAX_LABEL
from cellseg.io import atomic_path, read_gray, write_png
from cellseg.sources import SourceData

log = logging.getLogger(__name__)

LABELS_DIR = "labels"
IMAGES_TABLE = "images.parquet"
INSTANCES_TABLE = "instances.parquet"


@dataclass(frozen=True)
class DecodedImage:
    """One image's label image and its instances' table rows."""

    labels: np.ndarray
    instances: pd.DataFrame
    overlap_pixels: int


def decode_image(annotations: pd.DataFrame, shape: tuple[int, int], where: Path) -> DecodedImage:
    """Paint one image's annotations (one or more rows of ``SourceData.annotations``) into a uint16 label image."""
    height, width = shape
    if len(annotations) > MAX_LABEL:
        raise DataError(f"{where}: {len(annotations)} instances in one image; at most {MAX_LABEL} fit in uint16")
    indices = instance_pixels(annotations, shape, where)
    areas = np.array([len(i) for i in indices], dtype=np.int64)
    labels = np.zeros(height * width, dtype=np.uint16)
    for k in paint_order(areas):
        labels[indices[k]] = k + 1
    kept = np.bincount(labels, minlength=len(indices) + 1)[1:]
    claimed = np.concatenate(indices)
    overlap_pixels = int((np.bincount(claimed, minlength=height * width) > 1).sum())
    rows, cols = np.divmod(claimed, width)
    first = np.cumsum(areas) - areas
    last = first + areas - 1
    instances = pd.DataFrame(
        {
            "label": np.arange(1, len(indices) + 1, dtype=np.int64),
            "row": annotations["row"].to_numpy(),
            "area": areas,
            "x0": np.minimum.reduceat(cols, first),
            "y0": rows[first],
            "x1": np.maximum.reduceat(cols, first) + 1,
            "y1": rows[last] + 1,
            "overlap_lost": areas - kept,
            "annotation": annotations["annotation"].to_numpy(),
        }
    )
    return DecodedImage(labels.reshape(height, width), instances, overlap_pixels)


def instance_pixels(annotations: pd.DataFrame, shape: tuple[int, int], where: Path) -> list[np.ndarray]:
    """Each annotation's flat (row-major) pixel indices in an image of ``shape``; errors name ``where`` and the row."""
    indices = []
    for row, annotation in zip(annotations["row"], annotations["annotation"]):
        try:
            indices.append(rle.pixels(annotation, shape))
        except rle.RLEError as exc:
            raise DataError(f"{where}: row {row}: malformed RLE: {exc}") from None
        if not len(indices[-1]):
            raise DataError(f"{where}: row {row}: annotation is empty")
    return indices


def paint_order(areas: np.ndarray) -> np.ndarray:
    """Indices in painting order (the overlap rule): largest area first; among equal areas the later row first."""
    return np.lexsort((-np.arange(len(areas)), -areas))


def read_source_image(data: SourceData, image: Any) -> np.ndarray:
    """The pixels of one ``data.images`` row (a namedtuple), checked against the size the annotations give."""
    pixels = read_gray(data.root / image.file_name)
    if pixels.shape != (image.height, image.width):
        raise DataError(
            f"{data.root / image.file_name}: image is {pixels.shape[1]}x{pixels.shape[0]} but "
            f"{data.annotation_file} row {image.row} says {image.width}x{image.height}"
        )
    return pixels


def decode_dataset(data: SourceData, out_dir: str | Path) -> pd.DataFrame:
    """Decode every image of ``data`` into ``out_dir`` (atomically) and return the image table written."""
    image_rows, instance_tables = [], []
    by_image = dict(tuple(data.annotations.groupby("image_id", sort=False)))
    with atomic_path(out_dir, directory=True) as tmp:
        (tmp / LABELS_DIR).mkdir()
        for image in tqdm(data.images.itertuples(index=False), total=len(data.images), desc="decode", unit="img"):
            pixels = read_source_image(data, image)
            decoded = decode_image(by_image[image.image_id], pixels.shape, data.annotation_file)
            write_png(tmp / LABELS_DIR / f"{image.image_id}.png", decoded.labels)
            instance_tables.append(decoded.instances.assign(image_id=image.image_id, cell_type=image.cell_type))
            image_rows.append(
                {
                    **image._asdict(),
                    "n_cells": len(decoded.instances),
                    "overlap_pixels": decoded.overlap_pixels,
                    "overlap_lost": int(decoded.instances["overlap_lost"].sum()),
                }
            )
        images = pd.DataFrame(image_rows)
        instances = pd.concat(instance_tables, ignore_index=True)
        instances = instances[["image_id", "label", "cell_type", *instances.columns[:-2].drop("label")]]
        images.to_parquet(tmp / IMAGES_TABLE, index=False)
        instances.to_parquet(tmp / INSTANCES_TABLE, index=False)
    log.info(
        "decoded %d images, %d instances; %d pixels claimed by 2+ instances, %d instance pixels reassigned",
        len(images), len(instances), images["overlap_pixels"].sum(), images["overlap_lost"].sum(),
    )
    return images
