"""COCO instance-segmentation export of the decoded data set (``coco_train.json``, ``coco_val.json``), its masks
as compressed RLE byte for byte what pycocotools gives (:mod:`cellseg.cocorle`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from cellseg.cocorle import batched, rle_to_coco
from cellseg.errors import DataError
from cellseg.io import atomic_path
from cellseg.celltypes import CATEGORY_IDS
from cellseg.sources import IMAGE_METADATA


def to_coco(images: pd.DataFrame, instances: pd.DataFrame, image_ids: Sequence[str]) -> dict:
    """A COCO instance dict for ``image_ids`` (in that order) from the decoded ``images``/``instances`` tables.

    Images are numbered 1..n and keep their string id as ``image_key``; annotations are numbered 1..N, image by
    image in label order, with each instance's own mask (overlaps included) as compressed RLE.
    """
    ids = list(image_ids)
    table = images.set_index("image_id")
    unknown = [i for i in ids if i not in table.index]
    if unknown:
        raise DataError(f"to_coco: image id {unknown[0]!r} is not in the images table")
    listed = pd.Index(ids)
    if listed.has_duplicates:
        raise DataError(f"to_coco: image id {listed[listed.duplicated()][0]!r} is listed twice")
    chosen = table.loc[ids]
    number = pd.Series(np.arange(1, len(ids) + 1), index=ids)
    cells = instances[instances["image_id"].isin(number.index)]
    cells = cells.assign(_image=cells["image_id"].map(number).to_numpy()).sort_values(["_image", "label"])
    heights = chosen["height"].to_numpy(np.int64)[cells["_image"].to_numpy() - 1]
    widths = chosen["width"].to_numpy(np.int64)[cells["_image"].to_numpy() - 1]
    keys = list(zip(cells["image_id"], cells["label"]))
    segmentations = rle_to_coco(
        cells["annotation"].tolist(), heights, widths, lambda k: f"to_coco: image {keys[k][0]!r} label {keys[k][1]}"
    )
    areas = batched(mask_utils.area, segmentations)
    boxes = batched(mask_utils.toBbox, segmentations)
    metadata = [c for c in IMAGE_METADATA if c in chosen.columns]
    return {
        "info": {"description": "Sartorius cell instance segmentation (cellseg)", "version": "1.0"},
        "licenses": [],
        "categories": [{"id": i, "name": name, "supercategory": "cell"} for name, i in CATEGORY_IDS.items()],
        "images": [
            {
                "id": k + 1,
                "file_name": image.file_name,
                "width": int(image.width),
                "height": int(image.height),
                "image_key": image_id,
                "cell_type": image.cell_type,
                **{c: str(getattr(image, c)) for c in metadata},
            }
            for k, (image_id, image) in enumerate(zip(ids, chosen.itertuples(index=False)))
        ],
        "annotations": [
            {
                "id": k + 1,
                "image_id": int(image),
                "category_id": CATEGORY_IDS[cell_type],
                "segmentation": segmentation,
                "area": int(area),
                "bbox": box,
                "iscrowd": 0,
            }
            for k, (image, cell_type, segmentation, area, box) in enumerate(
                zip(cells["_image"], cells["cell_type"], segmentations, areas.tolist(), boxes.tolist())
            )
        ],
    }


def write_coco(path: str | Path, coco: dict) -> None:
    """Write a COCO dict as compact JSON (half the size of indented, four times faster), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
