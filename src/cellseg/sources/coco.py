"""The ``livecell`` source: a COCO instance json as a data source (LIVECell's own, or one written by
:func:`cellseg.coco.write_coco`).

:func:`read_livecell` reads a directory holding ``annotations.json`` and the images at the paths its
``file_name`` fields give, relative to that directory.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from cellseg.cocorle import coco_to_rle
from cellseg.errors import DataError
from cellseg.celltypes import CELL_TYPES
from cellseg.sources import IMAGE_COLUMNS, IMAGE_METADATA, SAFE_ID, SourceData, listing

log = logging.getLogger(__name__)

LIVECELL_JSON = "annotations.json"
LIVECELL_LINES: dict[str, str] = {"SHSY5Y": "shsy5y"}  # LIVECell cell line (file name prefix) → cell_type
_LIVECELL_NAME = re.compile(r"(?P<sample>.+)_\d+d\d+h\d+m_\d+")  # <line>_Phase_<well>_<location>_<time>_<crop>


def read_livecell(root: str | Path) -> SourceData:
    """The ``livecell`` source: ``root/annotations.json``, its images at their ``file_name`` under ``root``."""
    root = Path(root)
    return coco_to_source(root / LIVECELL_JSON, root)


def coco_to_source(json_path: str | Path, image_root: str | Path) -> SourceData:
    """Read a COCO instance file (LIVECell's or :func:`write_coco`'s) into the common :class:`SourceData` form.

    Segmentations may be polygons, uncompressed or compressed RLE. An image's cell type is its ``cell_type``
    key, else its annotations' category name when that is a cell type, else its LIVECell cell line (the file
    name prefix, see :data:`LIVECELL_LINES`); ``sample_id`` is its ``sample_id`` key, else the file name without
    the time and crop parts (LIVECell: line, well and location). ``row`` is the 1-based position in the json's
    ``images`` (for images) or ``annotations`` (for annotations). Images without annotations are left out.
    Every problem raises :class:`DataError` naming the json file and the image or annotation id.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    coco = _read_json(json_path)
    category_types = _category_types(coco["categories"], json_path)
    images = _read_images(coco["images"], json_path)
    cells = _read_annotations(coco["annotations"], images, category_types, json_path)
    if cells.empty:
        raise DataError(f"{json_path}: no annotations")
    images = _resolve_cell_types(images, cells)
    cells["annotation"] = coco_to_rle(cells["rle"].tolist(), cells["where"].tolist().__getitem__)
    cells = _drop_exact_duplicates(cells, json_path)
    _check_cells(cells)
    annotated = images["coco_id"].isin(cells["image"])
    if not annotated.all():
        log.warning("%s: %d image(s) without annotations left out", json_path, int((~annotated).sum()))
    images = images[annotated].reset_index(drop=True)
    _check_image_files(images, image_root)
    image_ids = cells["image"].map(images.set_index("coco_id")["image_id"])
    annotations = pd.DataFrame({"image_id": image_ids, "row": cells["row"], "annotation": cells["annotation"]})
    log.info("read %d images, %d annotations from %s", len(images), len(annotations), json_path)
    return SourceData(image_root, json_path, images[list(IMAGE_COLUMNS)], annotations.reset_index(drop=True))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file is missing")
    try:
        coco = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco, dict) or key not in coco]
    if missing:
        raise DataError(f"{path}: not a COCO instance file: missing {', '.join(missing)}")
    if isinstance(coco["annotations"], dict):  # LIVECell keys its annotations by id
        coco["annotations"] = list(coco["annotations"].values())
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list) or not all(isinstance(item, dict) for item in coco[key]):
            raise DataError(f"{path}: {key} must be a list of objects")
    return coco


def _category_types(categories: list[dict], path: Path) -> dict[Any, str | None]:
    """Category id → cell type when its name is one (else ``None``, e.g. LIVECell's single "cell")."""
    types = {}
    for position, category in enumerate(categories, 1):
        if "id" not in category or "name" not in category:
            raise DataError(f"{path}: category #{position} lacks an id or a name")
        types[category["id"]] = category["name"] if category["name"] in CELL_TYPES else None
    return types


def _is_relative_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not Path(value).is_absolute() and ".." not in Path(value).parts


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_images(items: list[dict], path: Path) -> pd.DataFrame:
    rows = []
    for position, item in enumerate(items, 1):
        where = f"{path}: image {item.get('id')!r} (#{position})"
        missing = [key for key in ("id", "file_name", "width", "height") if key not in item]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        file_name = item["file_name"]
        if not _is_relative_path(file_name):
            raise DataError(f"{where}: file_name {file_name!r} must be a path relative to the image directory")
        if not (_positive_int(item["width"]) and _positive_int(item["height"])):
            size = f"{item['width']!r} x {item['height']!r}"
            raise DataError(f"{where}: width and height must be positive integers, got {size}")
        image_id = item.get("image_key", Path(file_name).stem)
        if not isinstance(image_id, str) or not SAFE_ID.fullmatch(image_id) or image_id in (".", ".."):
            raise DataError(f"{where}: image key {image_id!r} is not a safe file name (letters, digits, '.', '_', '-')")
        cell_type = item.get("cell_type")
        if cell_type is not None and cell_type not in CELL_TYPES:
            raise DataError(f"{where}: unknown cell_type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}")
        livecell = _LIVECELL_NAME.fullmatch(Path(file_name).stem)
        rows.append(
            {
                "coco_id": item["id"],
                "image_id": image_id,
                "file_name": file_name,
                "width": item["width"],
                "height": item["height"],
                "cell_type": cell_type,
                **{key: str(item.get(key, "")) for key in IMAGE_METADATA},
                "sample_id": str(item.get("sample_id", livecell["sample"] if livecell else Path(file_name).stem)),
                "row": position,
                "where": where,
            }
        )
    columns = ["coco_id", "image_id", "file_name", "width", "height", "cell_type", *IMAGE_METADATA, "row", "where"]
    images = pd.DataFrame(rows, columns=columns)
    for key in ("coco_id", "image_id"):
        duplicated = images[key].duplicated()
        if duplicated.any():
            raise DataError(f"{images['where'][duplicated].iloc[0]}: {key.replace('_', ' ')} is not unique")
    return images.astype({"width": np.int64, "height": np.int64, "row": np.int64})


def _read_annotations(
    items: list[dict], images: pd.DataFrame, category_types: dict[Any, str | None], path: Path
) -> pd.DataFrame:
    shapes = dict(zip(images["coco_id"], zip(images["height"].tolist(), images["width"].tolist())))
    rows = []
    for position, item in enumerate(items, 1):
        where = f"{path}: annotation {item.get('id')!r} (#{position})"
        if item.get("image_id") not in shapes:
            raise DataError(f"{where}: image_id {item.get('image_id')!r} is not among the images")
        if item.get("category_id") not in category_types:
            raise DataError(f"{where}: unknown category_id {item.get('category_id')!r}")
        if item.get("iscrowd"):
            raise DataError(f"{where}: crowd annotations (iscrowd 1) are not single cells")
        height, width = shapes[item["image_id"]]
        try:
            compressed = _compressed(item.get("segmentation"), height, width)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DataError(f"{where}: bad segmentation: {exc}") from None
        rows.append((item["image_id"], category_types[item["category_id"]], compressed, position, where))
    return pd.DataFrame(rows, columns=["image", "category_type", "rle", "row", "where"]).astype({"row": np.int64})


def _compressed(segmentation: Any, height: int, width: int) -> dict:
    """One segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE dict of the image's size."""
    if isinstance(segmentation, list):
        polygons = [np.asarray(polygon, dtype=np.float64) for polygon in segmentation]
        if not polygons or not all(p.ndim == 1 and len(p) >= 6 and not len(p) % 2 for p in polygons):
            raise ValueError("polygons must be lists of at least 3 (x, y) points")
        if not all(np.isfinite(p).all() for p in polygons):
            raise ValueError("polygon coordinates must be finite numbers")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        raise ValueError("expected polygons or an RLE object with counts and size")
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"RLE size {segmentation['size']!r} is not the image's [height, width] {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    raise ValueError("RLE counts must be a string or a list of non-negative integers")


def _resolve_cell_types(images: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Fill each image's cell type (key, else its annotations' category, else its LIVECell line); check agreement."""
    typed = cells.dropna(subset=["category_type"])
    by_category = images["coco_id"].map(typed.drop_duplicates("image").set_index("image")["category_type"])
    lines = images["file_name"].map(lambda name: Path(name).name.split("_")[0])
    images = images.assign(cell_type=images["cell_type"].fillna(by_category).fillna(lines.map(LIVECELL_LINES)))
    unknown = images["cell_type"].isna()
    if unknown.any():
        image = images[unknown].iloc[0]
        raise DataError(
            f"{image['where']}: cell line {lines[unknown].iloc[0]!r} of {image['file_name']!r} is not a competition "
            f"cell type (known: {', '.join(f'{k} → {v}' for k, v in LIVECELL_LINES.items())}); "
            "give the image a cell_type key"
        )
    expected = typed["image"].map(images.set_index("coco_id")["cell_type"])
    conflict = typed["category_type"] != expected
    if conflict.any():
        bad = typed[conflict].iloc[0]
        cell_type = expected[conflict].iloc[0]
        category = bad["category_type"]
        raise DataError(f"{bad['where']}: category {category!r} differs from its image's cell type {cell_type!r}")
    return images


def _drop_exact_duplicates(cells: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Drop annotations that repeat an earlier one of the same image exactly (same mask, same category), with
    one warning naming them: nothing is lost. The same mask under another category is refused by
    :func:`_check_cells`."""
    repeated = cells.duplicated(["image", "annotation", "category_type"]) & (cells["annotation"] != "")
    if repeated.any():
        dropped = [where.split(": ", 1)[-1] for where in cells["where"][repeated]]
        log.warning(
            "%s: dropped %d annotation(s) that repeat an earlier one of the same image exactly: %s",
            path, len(dropped), listing(dropped, separator="; "),
        )
    return cells[~repeated].reset_index(drop=True)


def _check_cells(cells: pd.DataFrame) -> None:
    empty = cells["annotation"] == ""
    if empty.any():
        raise DataError(f"{cells['where'][empty].iloc[0]}: segmentation covers no pixel")
    duplicated = cells.duplicated(["image", "annotation"])
    if duplicated.any():
        bad = cells[duplicated].iloc[0]
        first = cells[(cells["image"] == bad["image"]) & (cells["annotation"] == bad["annotation"])].iloc[0]
        raise DataError(f"{bad['where']}: same mask as annotation #{first['row']} of the same image")


def _check_image_files(images: pd.DataFrame, root: Path) -> None:
    """Every image exists, has a readable header, a greyscale-compatible mode and the json's size."""
    for image in images.itertuples(index=False):
        file = root / image.file_name
        if not file.is_file():
            raise DataError(f"{image.where}: image file {file} is missing")
        try:
            with Image.open(file) as handle:
                mode, size = handle.mode, handle.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{image.where}: {file} is not a readable image ({exc})") from None
        if mode not in ("L", "LA", "RGB", "RGBA"):
            raise DataError(f"{image.where}: {file}: expected an 8-bit greyscale image, got PIL mode {mode!r}")
        if size != (image.width, image.height):
            json_size = f"{image.width}x{image.height}"
            raise DataError(f"{image.where}: {file} is {size[0]}x{size[1]} but the json says {json_size}")
