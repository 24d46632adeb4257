"""Reader for the Sartorius Kaggle download: ``train.csv`` (one row per cell) + ``train/<id>.png``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cellseg.errors import DataError
from cellseg.celltypes import CELL_TYPES
from cellseg.sources import IMAGE_COLUMNS, SAFE_ID, SourceData, listing

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "id",
    "annotation",
    "width",
    "height",
    "cell_type",
    "plate_time",
    "sample_date",
    "sample_id",
    "elapsed_timedelta",
)
METADATA_COLUMNS: tuple[str, ...] = ("plate_time", "sample_date", "sample_id", "elapsed_timedelta")
_FIRST_DATA_LINE = 2  # line 1 is the header
_MAX_SIDE = 2**31 - 1  # width/height beyond this cannot be an image's (and would overflow the int64 cast)


def read_kaggle(root: str | Path, *, csv_name: str = "train.csv", image_dir: str = "train") -> SourceData:
    """Read and validate a Kaggle-format directory; every problem raises :class:`DataError` naming file and row."""
    root = Path(root)
    csv_path = root / csv_name
    table = _read_csv(csv_path)
    table = _drop_exact_duplicates(table, csv_path)
    _check_values(table, csv_path)
    _warn_blank_metadata(table, csv_path)
    images = _image_table(table, csv_path, image_dir)
    _check_images(images, root, csv_path)
    annotations = pd.DataFrame(
        {"image_id": table["id"], "row": table["row"], "annotation": table["annotation"]}
    ).reset_index(drop=True)
    log.info("read %d images, %d annotations from %s", len(images), len(annotations), csv_path)
    return SourceData(root=root, annotation_file=csv_path, images=images, annotations=annotations)


def _read_csv(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: annotation file is missing")
    try:
        # Blank lines are kept (and refused below): skipping them would shift every later row number.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: file is empty (expected a header and one row per cell)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    if not isinstance(table.index, pd.RangeIndex):  # pandas took the rows' extra first field as an index
        raise DataError(f"{csv_path}: row {_FIRST_DATA_LINE} has more fields than the header ({len(table.columns)})")
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
    extra = [c for c in table.columns if c not in CSV_COLUMNS]
    if extra:
        raise DataError(f"{csv_path}: unexpected column(s) {', '.join(map(str, extra))}; expected {','.join(CSV_COLUMNS)}")
    if table.empty:
        raise DataError(f"{csv_path}: no annotation rows (only a header)")
    table = table.astype(str)
    table["row"] = np.arange(_FIRST_DATA_LINE, _FIRST_DATA_LINE + len(table))
    blank = (table[list(CSV_COLUMNS)].apply(lambda column: column.str.strip()) == "").all(axis=1)
    if blank.any():
        row = table["row"][blank].iloc[0]
        raise DataError(f"{csv_path}: row {row}: blank row (expected one row per cell, no blank lines)")
    fields = _field_counts(csv_path)
    short = fields < len(CSV_COLUMNS)
    if len(fields) == len(table) and short.any():  # (a quoted newline in a field would make them disagree)
        row = table["row"].to_numpy()[short][0]
        found = fields[short][0]
        raise DataError(f"{csv_path}: row {row}: {found} field(s), the header has {len(CSV_COLUMNS)} (a row cut short?)")
    return table


def _field_counts(csv_path: Path) -> np.ndarray:
    """The number of fields of every record after the header (pandas pads short rows with empty strings)."""
    limit = csv.field_size_limit(2**31 - 1)  # pandas has read the file already: no field is too long for it
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            records = csv.reader(handle)
            next(records, None)
            return np.fromiter((len(record) for record in records), dtype=np.int64)
    finally:
        csv.field_size_limit(limit)


def _drop_exact_duplicates(table: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    """Drop rows that repeat an earlier row exactly (the competition's own ``train.csv`` has 15), with one warning.

    Nothing is lost: the dropped rows are identical to the rows kept. A row that repeats an annotation but
    differs in another field is not an exact duplicate, and is refused by :func:`_check_values`.
    """
    repeated = table.duplicated(list(CSV_COLUMNS), keep="first") & (table["annotation"].str.strip() != "")
    if not repeated.any():
        return table
    dropped = table[repeated]
    images = list(dict.fromkeys(dropped["id"]))
    rows = dropped["row"].tolist()
    log.warning(
        "%s: dropped %d row(s) that repeat an earlier row of the same image exactly, in %d image(s): %s "
        "(rows %s)", csv_path, len(dropped), len(images), listing(images), listing(rows),
    )
    return table[~repeated].reset_index(drop=True)


def _warn_blank_metadata(table: pd.DataFrame, csv_path: Path) -> None:
    """One warning naming the metadata columns left blank, and for how many images (accepted, as Kaggle's
    re-publications of ``train.csv`` leave them)."""
    firsts = table.drop_duplicates("id")
    blank = {column: int((firsts[column].str.strip() == "").sum()) for column in METADATA_COLUMNS}
    blank = {column: n for column, n in blank.items() if n}
    if blank:
        counts = ", ".join(f"{column} ({n})" for column, n in blank.items())
        grouping = (
            "; without a sample_id each such image is its own group in the split" if "sample_id" in blank else ""
        )
        log.warning("%s: blank metadata accepted, images without it: %s of %d%s", csv_path, counts, len(firsts), grouping)


def _fail(csv_path: Path, rows: pd.Series | pd.DataFrame, problem: str) -> None:
    row = rows.iloc[0]
    raise DataError(f"{csv_path}: row {row['row']} (id {row['id']!r}): {problem}")


def _check_values(table: pd.DataFrame, csv_path: Path) -> None:
    bad_id = ~table["id"].map(lambda s: bool(SAFE_ID.fullmatch(s)) and s not in (".", ".."))
    if bad_id.any():
        _fail(csv_path, table[bad_id], "id is not a safe file name (letters, digits, '.', '_', '-' only; no path separators or '..')")
    unknown = ~table["cell_type"].isin(CELL_TYPES)
    if unknown.any():
        row = table[unknown].iloc[0]
        _fail(csv_path, table[unknown], f"unknown cell_type {row['cell_type']!r}; expected one of {', '.join(CELL_TYPES)}")
    for column in ("width", "height"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | (values <= 0) | (values != values.round()) | (values > _MAX_SIDE)  # also ±inf
        if bad.any():
            _fail(csv_path, table[bad], f"{column} {table[bad][column].iloc[0]!r} is not a positive integer")
        table[column] = values.astype(np.int64)
    duplicated = table.duplicated(["id", "annotation"], keep="first") & (table["annotation"].str.strip() != "")
    if duplicated.any():  # exact duplicates are gone: this one differs in another field
        dup = table[duplicated].iloc[0]
        first = table[(table["id"] == dup["id"]) & (table["annotation"] == dup["annotation"])].iloc[0]
        _fail(csv_path, table[duplicated], f"duplicate annotation (same as row {first['row']}, other fields differ)")
    empty = table["annotation"].str.strip() == ""
    if empty.any():
        _fail(csv_path, table[empty], "annotation is empty")
    per_image = ["width", "height", "cell_type", *METADATA_COLUMNS]
    for column in per_image:
        first = table.groupby("id", sort=False)[column].transform("first")
        differs = table[column] != first
        if differs.any():
            _fail(csv_path, table[differs], f"{column} {str(table[differs][column].iloc[0])!r} differs from the image's first row")


def _image_table(table: pd.DataFrame, csv_path: Path, image_dir: str) -> pd.DataFrame:
    firsts = table.drop_duplicates("id", keep="first")
    images = pd.DataFrame(
        {
            "image_id": firsts["id"],
            "file_name": [f"{image_dir}/{i}.png" for i in firsts["id"]],
            **{c: firsts[c] for c in IMAGE_COLUMNS if c not in ("image_id", "file_name")},
            "row": firsts["row"],
        }
    )
    return images.reset_index(drop=True)


def _check_images(images: pd.DataFrame, root: Path, csv_path: Path) -> None:
    """Every image exists, has a readable header, a greyscale-compatible mode and the CSV's size.

    Pixel data is read (and truncation caught) by the decode step, which reads every image anyway.
    """
    for image in images.itertuples(index=False):
        path = root / image.file_name
        where = f"{path} (id {image.image_id!r}, first row {image.row} of {csv_path})"
        if not path.is_file():
            raise DataError(f"{where}: image file is missing")
        try:
            with Image.open(path) as handle:
                mode, size = handle.mode, handle.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{where}: not a readable image ({exc})") from None
        if mode not in ("L", "LA", "RGB", "RGBA"):
            raise DataError(f"{where}: expected an 8-bit greyscale image, got PIL mode {mode!r}")
        if size != (image.width, image.height):
            raise DataError(
                f"{where}: image is {size[0]}x{size[1]} (width x height) but the CSV says {image.width}x{image.height}"
            )
