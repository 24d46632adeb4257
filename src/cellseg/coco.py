"""COCO instance-segmentation export of the decoded data set, and the inverse: a COCO json as a data source.

Masks move between the competition's row-major runs and COCO's column-major RLE without building full-size
masks, all instances at once: going from one order to the other is transposing each mask, done by
:func:`_transpose_runs` on every run of every instance together. The COCO strings themselves are made by
pycocotools (from the column-major counts) and read back by a vectorized copy of its decoder, so the result
is byte for byte what ``pycocotools.mask.encode`` gives for the full mask.

The ``livecell`` source (:func:`read_livecell`) is a directory holding ``annotations.json`` (a COCO instance
file: LIVECell's own, or one written by :func:`write_coco`) and the images at the paths its ``file_name``
fields give, relative to that directory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from cellseg import rle
from cellseg.errors import DataError
from cellseg.io import atomic_path
from cellseg.sources import CELL_TYPES, IMAGE_COLUMNS, SourceData, listing

log = logging.getLogger(__name__)

CATEGORY_IDS: dict[str, int] = {name: k + 1 for k, name in enumerate(CELL_TYPES)}
LIVECELL_JSON = "annotations.json"
LIVECELL_LINES: dict[str, str] = {"SHSY5Y": "shsy5y"}  # LIVECell cell line (file name prefix) → cell_type
IMAGE_METADATA: tuple[str, ...] = ("sample_id", "plate_time", "sample_date", "elapsed_timedelta")

_CHUNK = 2000  # instances converted at once: bounds memory, and keeps the arrays small enough to stay fast
_PYCOCO_BATCH = 255  # pycocotools 2.0.11 area()/toBbox() overflow a uint8 on longer lists under NumPy 2
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_LIVECELL_NAME = re.compile(r"(?P<sample>.+)_\d+d\d+h\d+m_\d+")  # <line>_Phase_<well>_<location>_<time>_<crop>

Runs = tuple[np.ndarray, np.ndarray, np.ndarray]  # 0-based starts, lengths, owner (instance index, sorted)
Describe = Callable[[int], str]  # an item's index → how error messages name it


# ---------------------------------------------------------------------------------------------------- export


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
    areas = _batched(mask_utils.area, segmentations)
    boxes = _batched(mask_utils.toBbox, segmentations)
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


def _batched(function: Callable[[list[dict]], np.ndarray], rles: list[dict]) -> np.ndarray:
    """Apply a pycocotools batch function to ``rles`` a slice at a time (see ``_PYCOCO_BATCH``)."""
    parts = [function(rles[i : i + _PYCOCO_BATCH]) for i in range(0, len(rles), _PYCOCO_BATCH)]
    return np.concatenate(parts or [np.zeros(0)])


# ------------------------------------------------------------------------------------------- RLE conversions


def rle_to_coco(
    annotations: Sequence[str],
    heights: np.ndarray,
    widths: np.ndarray,
    describe: Describe = "annotation {}".format,
) -> list[dict]:
    """Competition RLE strings (masks of ``heights[k]`` × ``widths[k]``) → COCO compressed RLE dicts (str counts).

    A malformed string raises :class:`DataError` starting with ``describe(k)``.
    """
    return _in_chunks(_rle_to_coco, annotations, np.asarray(heights, np.int64), np.asarray(widths, np.int64), describe)


def coco_to_rle(rles: Sequence[dict], describe: Describe = "annotation {}".format) -> list[str]:
    """COCO compressed RLE dicts (``size`` [h, w], ``counts`` str or bytes) → competition RLE strings.

    A malformed RLE raises :class:`DataError` starting with ``describe(k)``.
    """
    heights = np.array([int(r["size"][0]) for r in rles], np.int64)
    widths = np.array([int(r["size"][1]) for r in rles], np.int64)
    return _in_chunks(_coco_to_rle, rles, heights, widths, describe)


def _in_chunks(
    convert: Callable[..., list], items: Sequence, heights: np.ndarray, widths: np.ndarray, describe: Describe
) -> list:
    """``convert`` applied to :data:`_CHUNK` items at a time, the results concatenated."""
    converted = []
    for a in range(0, len(items), _CHUNK):
        b = a + _CHUNK
        converted += convert(items[a:b], heights[a:b], widths[a:b], lambda k, a=a: describe(a + k))
    return converted


def _rle_to_coco(annotations: Sequence[str], heights: np.ndarray, widths: np.ndarray, describe: Describe) -> list[dict]:
    starts, lengths, owner = _transpose_runs(*_parse_runs(annotations, heights * widths, describe), heights, widths)
    counts = _counts(starts, lengths, owner, heights * widths)
    uncompressed = [{"counts": c, "size": [h, w]} for c, h, w in zip(counts, heights.tolist(), widths.tolist())]
    return [
        {"size": r["size"], "counts": r["counts"].decode("ascii")}
        for r in mask_utils.frPyObjects(uncompressed, 0, 0)  # sizes are taken from each dict
    ]


def _coco_to_rle(rles: Sequence[dict], heights: np.ndarray, widths: np.ndarray, describe: Describe) -> list[str]:
    strings = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else bytes(r["counts"]) for r in rles]
    counts, n_counts, valid = _decompress(strings, heights * widths)
    if not valid.all():
        bad = int(np.argmin(valid))
        raise DataError(
            f"{describe(bad)}: malformed RLE (bad characters, negative counts, or counts that do not add up to "
            f"the {heights[bad]}x{widths[bad]} image)"
        )
    # column-major runs of a mask are the row-major runs of its transpose, so transposing (w × h) gives it back
    starts, lengths, owner = _transpose_runs(*_runs_from_counts(counts, n_counts), widths, heights)
    pairs = np.empty(2 * len(starts), np.int64)
    pairs[0::2], pairs[1::2] = starts + 1, lengths
    tokens = list(map(str, pairs.tolist()))
    ends = 2 * np.cumsum(np.bincount(owner, minlength=len(rles)))
    return [" ".join(tokens[a:b]) for a, b in zip([0, *ends[:-1].tolist()], ends.tolist())]


def _parse_runs(annotations: Sequence[str], n_pixels: np.ndarray, describe: Describe) -> Runs:
    """All runs of all annotations, validated as strictly as :func:`cellseg.rle.parse` does.

    All at once when every string is well-formed; otherwise string by string with ``rle.parse``, which names
    the problem.
    """
    runs = _parse_well_formed(annotations, n_pixels)
    if runs is not None:
        return runs
    parsed = []
    for k, annotation in enumerate(annotations):
        try:
            parsed.append(rle.parse(annotation, int(n_pixels[k])))
        except rle.RLEError as exc:
            raise DataError(f"{describe(k)}: malformed RLE: {exc}") from None
    n_runs = [len(s) for s, _ in parsed]
    return (
        np.concatenate([s for s, _ in parsed]),
        np.concatenate([length for _, length in parsed]),
        np.repeat(np.arange(len(parsed)), n_runs),
    )


def _parse_well_formed(annotations: Sequence[str], n_pixels: np.ndarray) -> Runs | None:
    """All runs, parsed at once, or ``None`` unless every string passes the checks of ``rle.parse``."""
    n_tokens = np.fromiter((len(a.split()) for a in annotations), np.int64, len(annotations))
    try:
        tokens = np.fromstring(" ".join(annotations), dtype=np.int64, sep=" ")
    except ValueError:  # a token that is not an integer
        return None
    if len(tokens) != n_tokens.sum() or (n_tokens % 2).any():
        return None
    owner = np.repeat(np.arange(len(annotations)), n_tokens // 2)
    starts, lengths, limit = tokens[0::2] - 1, tokens[1::2], n_pixels[owner]
    # tokens beyond int64 saturate at its maximum: bounding starts and lengths first keeps ``ends`` exact
    if not ((starts >= 0) & (starts < limit) & (lengths >= 1) & (lengths <= limit)).all():
        return None
    ends = starts + lengths
    follows = np.ones(len(starts), bool)
    follows[1:] = (owner[1:] != owner[:-1]) | (starts[1:] >= ends[:-1])
    if not ((ends <= limit) & follows).all():
        return None
    return starts, lengths, owner


def _transpose_runs(
    starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, heights: np.ndarray, widths: np.ndarray
) -> Runs:
    """Row-major runs of masks (mask ``k`` is ``heights[k]`` × ``widths[k]``) → row-major runs of their transposes.

    Input runs must be grouped by owner (sorted) but may touch or overlap; output runs are sorted, disjoint and
    merged. Each mask is painted, transposed, into its bounding box with one empty pad pixel closing every line,
    all boxes end to end in one flat array; the output runs are that array's edges, mapped back.
    """
    n = len(heights)
    width = widths[owner]
    row, col = np.divmod(starts, width)
    # a run that wraps onto the next image rows becomes one segment per row
    n_seg = (col + lengths - 1) // width + 1
    run = np.repeat(np.arange(len(starts)), n_seg)
    k = np.arange(len(run)) - np.repeat(np.cumsum(n_seg) - n_seg, n_seg)
    seg_owner, seg_row = owner[run], row[run] + k
    seg_c0 = np.where(k == 0, col[run], 0)
    seg_c1 = np.minimum(width[run], col[run] + lengths[run] - k * width[run])
    # bounding box per mask (empty masks keep a 0 × 0 box)
    present = np.flatnonzero(np.bincount(seg_owner, minlength=n))
    first = np.searchsorted(seg_owner, present)
    y0, y1, x0, x1 = (np.zeros(n, np.int64) for _ in range(4))
    y0[present] = np.minimum.reduceat(seg_row, first)
    y1[present] = np.maximum.reduceat(seg_row, first) + 1
    x0[present] = np.minimum.reduceat(seg_c0, first)
    x1[present] = np.maximum.reduceat(seg_c1, first)
    line = y1 - y0 + 1  # one transposed line per mask column, plus the pad pixel
    size = (x1 - x0) * line
    offset = np.cumsum(size) - size
    # paint: pixel (r, c) of mask o goes to offset[o] + (c - x0[o]) * line[o] + (r - y0[o]); a segment's pixels
    # are line[o] apart, so positions are a cumulative sum of steps, each segment's first step jumping to it
    o = seg_owner
    first_pos = offset[o] + (seg_c0 - x0[o]) * line[o] + (seg_row - y0[o])
    n_px = seg_c1 - seg_c0
    last_pos = first_pos + (n_px - 1) * line[o]
    steps = np.repeat(line[o], n_px)
    steps[np.cumsum(n_px) - n_px] = first_pos - np.concatenate([[0], last_pos[:-1]])
    painted = np.zeros(int(size.sum()) + 1, bool)
    painted[np.cumsum(steps) + 1] = True  # painted[0] stays empty, so that edges pair up as (start, end)
    edges = np.flatnonzero(painted[1:] != painted[:-1])
    begin, end = edges[0::2], edges[1::2]
    new_owner = np.searchsorted(offset, begin, side="right") - 1
    o = new_owner
    column, r = np.divmod(begin - offset[o], line[o])
    new_starts = (x0[o] + column) * heights[o] + y0[o] + r
    new_lengths = end - begin
    # runs that continue from the end of one transposed line onto the next one merge
    joins = np.zeros(len(new_starts), bool)
    joins[1:] = (new_owner[1:] == new_owner[:-1]) & (new_starts[1:] == new_starts[:-1] + new_lengths[:-1])
    keep = np.flatnonzero(~joins)
    return new_starts[keep], np.add.reduceat(new_lengths, keep), new_owner[keep]


def _counts(starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, n_pixels: np.ndarray) -> list[np.ndarray]:
    """Uncompressed COCO counts per mask (alternating background and foreground, background first)."""
    n = len(n_pixels)
    n_runs = np.bincount(owner, minlength=n)
    # per mask the boundaries 0, s0, e0, ..., sk, ek, n_pixels; the counts are their differences
    head = 2 * (np.cumsum(n_runs) - n_runs) + 2 * np.arange(n)
    bounds = np.empty(2 * len(starts) + 2 * n, np.int64)
    at = 2 * np.arange(len(starts)) + 2 * owner + 1
    bounds[at], bounds[at + 1] = starts, starts + lengths
    bounds[head], bounds[head + 2 * n_runs + 1] = 0, n_pixels
    differences = np.diff(bounds)
    n_counts = 2 * n_runs + 1 - (bounds[head + 2 * n_runs] == n_pixels)  # no trailing background count
    return [differences[a : a + m] for a, m in zip(head.tolist(), n_counts.tolist())]


def _decompress(strings: list[bytes], n_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pycocotools' ``rleFrString``, vectorized: all counts, the number per string, and which strings are valid.

    Each character holds 5 bits of a value, least significant first; its bit 0x20 says another character
    follows, bit 0x10 of a value's last character is the sign. From the fourth value of a string on, a value is
    a delta to the count two before. A string is valid when its characters are in range, it ends a value, no
    value is longer than 7 characters, and its counts are non-negative and sum to the image's pixel count.
    """
    n = len(strings)
    sizes = np.fromiter(map(len, strings), np.int64, n)
    chars = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    owner = np.repeat(np.arange(n), sizes)
    last = (chars & 0x20) == 0
    string_end = (np.cumsum(sizes) - 1)[sizes > 0]
    terminated = np.ones(n, bool)
    terminated[sizes > 0] = last[string_end]
    last[string_end] = True  # so that no value runs on into the next string
    value_end = np.flatnonzero(last)
    value_begin = np.concatenate([[0], value_end[:-1] + 1])
    n_chunks = value_end - value_begin + 1
    position = np.arange(len(chars)) - np.repeat(value_begin, n_chunks)
    values = np.add.reduceat((chars & 0x1F) << (5 * np.minimum(position, 7)), value_begin)
    values = np.where(chars[value_end] & 0x10, values - (1 << (5 * np.minimum(n_chunks, 7))), values)
    value_owner = owner[value_end]
    n_counts = np.bincount(value_owner, minlength=n)
    index = np.arange(len(values)) - np.repeat(np.cumsum(n_counts) - n_counts, n_counts)
    odd = index % 2 == 1
    odd_counts = _segment_cumsum(np.where(odd, values, 0), n_counts)
    even_counts = _segment_cumsum(np.where(~odd & (index > 0), values, 0), n_counts)
    counts = np.where(index == 0, values, np.where(odd, odd_counts, even_counts))
    flawed = ((chars < 0) | (chars >= 64)).astype(np.int64)
    flawed_values = ((counts < 0) | (n_chunks > 7)).astype(np.int64)
    valid = (
        terminated
        & (np.bincount(owner, weights=flawed, minlength=n) == 0)
        & (np.bincount(value_owner, weights=flawed_values, minlength=n) == 0)
        & (_segment_sum(counts, n_counts) == n_pixels)
    )
    return counts, n_counts, valid


def _segment_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments of ``sizes`` consecutive values), exact in int64."""
    total = np.concatenate([[0], np.cumsum(values)])
    return total[1:] - np.repeat(total[np.cumsum(sizes) - sizes], sizes)


def _segment_sum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum of each segment (0 for an empty one), exact in int64."""
    total = np.concatenate([[0], np.cumsum(values)])
    ends = np.cumsum(sizes)
    return total[ends] - total[ends - sizes]


def _runs_from_counts(counts: np.ndarray, n_counts: np.ndarray) -> Runs:
    """Foreground runs (empty ones dropped) of uncompressed COCO counts, ``n_counts[k]`` of them for mask ``k``."""
    owner = np.repeat(np.arange(len(n_counts)), n_counts)
    index = np.arange(len(counts)) - np.repeat(np.cumsum(n_counts) - n_counts, n_counts)
    foreground = (index % 2 == 1) & (counts > 0)
    begins = _segment_cumsum(counts, n_counts) - counts
    return begins[foreground], counts[foreground], owner[foreground]


# ---------------------------------------------------------------------------------------------------- source


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
        if not isinstance(image_id, str) or not _SAFE_ID.fullmatch(image_id) or image_id in (".", ".."):
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
