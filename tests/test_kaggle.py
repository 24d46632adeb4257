"""The Kaggle reader: every bad input is a DataError naming the file and the row; what real train.csv files
hold (exact duplicate rows, blank metadata) is accepted with one warning each."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellseg.errors import DataError
from cellseg.sources import subset
from cellseg.sources.read import load_source
from cellseg.sources.kaggle import CSV_COLUMNS, METADATA_COLUMNS, read_kaggle

LOGGER = "cellseg.sources.kaggle"


def _edit_csv(root: Path, edit) -> None:
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(root / "train.csv", index=False)


def _repeat_row(table: pd.DataFrame, i: int, **changes: str) -> None:
    """Append a copy of row ``i`` (0-based, CSV line i + 2) with ``changes``."""
    table.loc[len(table)] = {**table.iloc[i].to_dict(), **changes}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_reads_the_real_sample(real_dir: Path) -> None:
    data = read_kaggle(real_dir)
    assert len(data.images) == 1 and len(data.annotations) == 395
    image = data.images.iloc[0]
    assert (image.image_id, image.width, image.height, image.cell_type) == ("0030fd0e6378", 704, 520, "shsy5y")
    assert data.annotations["row"].tolist() == list(range(2, 397))


def test_reads_a_tiny_directory(make_kaggle) -> None:
    data = read_kaggle(make_kaggle())
    assert len(data.images) == 6 and len(data.annotations) == 18
    assert sorted(data.images["cell_type"].unique()) == ["astro", "cort", "shsy5y"]
    assert (data.images["width"] == 48).all() and data.images["width"].dtype == np.int64


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(columns="cell_type", inplace=True), "missing column"),
        (lambda t: t.insert(2, "extra", "x"), "unexpected column"),
        (lambda t: t.drop(t.index, inplace=True), "no annotation rows"),
        (
            lambda t: _repeat_row(t, 3, sample_id="other"),
            r"row 20 .*duplicate annotation \(same as row 5, other fields differ\)",
        ),
        (
            lambda t: _repeat_row(t, 3, plate_time="99h00m00s"),
            r"row 20 .*duplicate annotation \(same as row 5, other fields differ\)",
        ),
        (lambda t: t.loc.__setitem__((4, "cell_type"), "neuron"), r"row 6 .*unknown cell_type 'neuron'"),
        (lambda t: t.loc.__setitem__((0, "width"), "4x"), r"row 2 .*width '4x' is not a positive integer"),
        (lambda t: t.loc.__setitem__((1, "height"), "0"), r"row 3 .*height '0' is not a positive integer"),
        (lambda t: t.loc.__setitem__((1, "height"), "41"), r"row 3 .*height '41' differs from the image's first row"),
        (lambda t: t.loc.__setitem__((2, "sample_id"), "other"), r"row 4 .*sample_id 'other' differs"),
        (lambda t: t.loc.__setitem__((2, "sample_id"), ""), r"row 4 .*sample_id '' differs from the image's first row"),
        (lambda t: t.loc.__setitem__((0, "plate_time"), ""), r"row 3 .*plate_time '10h00m00s' differs"),
        (lambda t: t.loc.__setitem__((0, "id"), "../x"), r"row 2 .*not a safe file name"),
        (lambda t: t.loc.__setitem__((0, "id"), "a/b"), r"row 2 .*not a safe file name"),
        (lambda t: t.loc.__setitem__((0, "id"), ".."), r"row 2 .*not a safe file name"),
        (lambda t: t.loc.__setitem__((0, "annotation"), ""), r"row 2 .*annotation is empty"),
        (lambda t: t.loc.__setitem__((slice(0, 2), "width"), "50"), r"image is 48x40 .* CSV says 50x40"),
    ],
)
def test_bad_csv(make_kaggle, edit, message: str) -> None:
    root = make_kaggle()
    _edit_csv(root, edit)
    with pytest.raises(DataError, match=message) as info:
        read_kaggle(root)
    assert str(root / "train.csv") in str(info.value) or str(root / "train") in str(info.value)


def test_missing_or_empty_csv(make_kaggle) -> None:
    root = make_kaggle()
    (root / "train.csv").write_text("")
    with pytest.raises(DataError, match="train.csv: file is empty"):
        read_kaggle(root)
    (root / "train.csv").unlink()
    with pytest.raises(DataError, match="train.csv: annotation file is missing"):
        read_kaggle(root)


def test_ragged_csv(make_kaggle) -> None:
    root = make_kaggle()
    with open(root / "train.csv", "a") as handle:
        handle.write("a,b,c,d,e,f,g,h,i,j,k,l\n")
    with pytest.raises(DataError, match="not a readable CSV"):
        read_kaggle(root)


def _image(root: Path) -> Path:
    return next(iter(sorted((root / "train").glob("*.png"))))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "image file is missing"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: p.write_bytes(b"GIF89a not really an image"), "not a readable image"),
        (lambda p: Image.fromarray(np.zeros((40, 48), np.uint16) + 300).save(p), "expected an 8-bit greyscale image"),
        (lambda p: Image.new("1", (48, 40)).save(p), "expected an 8-bit greyscale image, got PIL mode '1'"),
        (lambda p: Image.fromarray(np.zeros((30, 48), np.uint8)).save(p), "image is 48x30"),
    ],
)
def test_bad_images(make_kaggle, damage, message: str) -> None:
    root = make_kaggle()
    path = _image(root)
    damage(path)
    with pytest.raises(DataError, match=message) as info:
        read_kaggle(root)
    assert str(path) in str(info.value) and "row" in str(info.value)


def test_colour_image_is_read_only_if_grey(make_kaggle) -> None:
    from cellseg.io import read_gray

    root = make_kaggle()
    path = _image(root)
    grey = np.asarray(Image.open(path))
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    assert np.array_equal(read_gray(path), grey)
    colour = np.stack([grey, grey, 255 - grey], axis=-1)
    Image.fromarray(colour).save(path)
    with pytest.raises(DataError, match="expected an 8-bit greyscale image, got PIL mode 'RGB'"):
        read_gray(path)


def test_subset_is_stratified_and_deterministic(make_kaggle) -> None:
    data = read_kaggle(make_kaggle(images_per_type=4))
    small = subset(data, 3, seed=1)
    assert sorted(small.images["cell_type"]) == ["astro", "cort", "shsy5y"]
    assert set(small.annotations["image_id"]) == set(small.images["image_id"])
    assert small.images.equals(subset(data, 3, seed=1).images)
    assert subset(data, None, 0) is data and subset(data, 100, 0) is data
    six = subset(data, 6, seed=2).images["cell_type"].value_counts()
    assert six.tolist() == [2, 2, 2]


def test_load_source_reads_and_subsets(make_kaggle) -> None:
    """``load_source`` reads the format ``data.source`` names (a synthetic set is in the Kaggle format) and takes
    the ``data.limit_images`` subset; the source name itself is the params' to check (tests/test_params.py)."""
    root = make_kaggle(images_per_type=4)
    whole = read_kaggle(root)
    for source in ("kaggle", "synthetic"):
        assert load_source(source, root).images.equals(whole.images)
        small = load_source(source, root, limit_images=3, seed=1)
        assert small.images.equals(subset(whole, 3, seed=1).images)
        assert small.annotations.equals(subset(whole, 3, seed=1).annotations)
    assert len(load_source("kaggle", root, limit_images=3, seed=1).images) == 3


def test_columns_are_the_competitions() -> None:
    assert ",".join(CSV_COLUMNS) == "id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta"


def test_exact_duplicate_row_is_dropped_with_one_warning(make_kaggle, caplog: pytest.LogCaptureFixture) -> None:
    root = make_kaggle()
    clean = read_kaggle(root)
    _edit_csv(root, lambda t: (_repeat_row(t, 3), _repeat_row(t, 3), _repeat_row(t, 9)))  # rows 20, 21, 22
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = read_kaggle(root)
    (message,) = _warnings(caplog)
    assert "dropped 3 row(s)" in message and "in 2 image(s): sh0000000001, as1000000001 (rows 20, 21, 22)" in message
    pd.testing.assert_frame_equal(data.images, clean.images)
    pd.testing.assert_frame_equal(data.annotations, clean.annotations)


def test_blank_metadata_is_accepted_with_one_warning(make_kaggle, caplog: pytest.LogCaptureFixture) -> None:
    root = make_kaggle()
    _edit_csv(root, lambda t: t.loc.__setitem__((slice(0, 5), list(METADATA_COLUMNS)), ""))  # images 1 and 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = read_kaggle(root)
    (message,) = _warnings(caplog)
    assert "blank metadata accepted" in message and "sample_id (2)" in message and "of 6" in message
    assert "its own group in the split" in message
    blank = data.images.set_index("image_id").loc[["sh0000000000", "sh0000000001"], list(METADATA_COLUMNS)]
    assert (blank == "").all(axis=None)
    assert (data.images["sample_id"] != "").sum() == 4 and len(data.annotations) == 18


def test_clean_csv_gives_no_warning(make_kaggle, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read_kaggle(make_kaggle())
    assert _warnings(caplog) == []


def test_short_row_is_refused(make_kaggle) -> None:
    """pandas pads a row with too few fields with empty strings: the reader counts the fields itself."""
    root = make_kaggle()
    lines = (root / "train.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 2)[0]  # line 6 loses its last two fields
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv: row 6: 7 field\(s\), the header has 9 \(a row cut short\?\)"):
        read_kaggle(root)


def test_reads_the_real_training_set(sartorius_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """All 361 images (PNG headers only), 15 exact duplicate rows dropped in 6 images, two warnings."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = read_kaggle(sartorius_dir)
    assert len(data.images) == 361
    assert data.images["cell_type"].value_counts().to_dict() == {"cort": 249, "astro": 88, "shsy5y": 24}
    assert len(data.annotations) == 23_586
    assert not data.annotations.duplicated(["image_id", "annotation"]).any()
    assert ((data.images["width"] == 704) & (data.images["height"] == 520)).all()
    duplicates, blank = _warnings(caplog)
    assert "dropped 15 row(s)" in duplicates and "in 6 image(s)" in duplicates
    assert all(f"{column} (360)" in blank for column in METADATA_COLUMNS) and "of 361" in blank
    raw = pd.read_csv(sartorius_dir / "train.csv", dtype=str, keep_default_na=False)
    assert len(raw) == 23_601 and len(raw.drop_duplicates()) == 23_586  # what was dropped: exact repeats only
