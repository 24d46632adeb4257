"""The Kaggle reader: every bad input is a DataError naming the file and the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellseg.errors import DataError, ParamsError
from cellseg.sources import load_source, subset
from cellseg.sources.kaggle import CSV_COLUMNS, read_kaggle


def _edit_csv(root: Path, edit) -> None:
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(root / "train.csv", index=False)


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
        (lambda t: t.loc.__setitem__(len(t), t.iloc[3]), r"row 20 .*duplicate annotation \(same as row 5\)"),
        (lambda t: t.loc.__setitem__((4, "cell_type"), "neuron"), r"row 6 .*unknown cell_type 'neuron'"),
        (lambda t: t.loc.__setitem__((0, "width"), "4x"), r"row 2 .*width '4x' is not a positive integer"),
        (lambda t: t.loc.__setitem__((1, "height"), "0"), r"row 3 .*height '0' is not a positive integer"),
        (lambda t: t.loc.__setitem__((1, "height"), "41"), r"row 3 .*height '41' differs from the image's first row"),
        (lambda t: t.loc.__setitem__((2, "sample_id"), "other"), r"row 4 .*sample_id 'other' differs"),
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


def test_unknown_source(make_kaggle) -> None:
    with pytest.raises(ParamsError, match="data.source: unknown source 'zenodo'"):
        load_source("zenodo", make_kaggle())


def test_columns_are_the_competitions() -> None:
    assert ",".join(CSV_COLUMNS) == "id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta"
