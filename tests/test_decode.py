"""Decode: label images, the overlap rule, tables and atomic output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellseg import rle
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, LABELS_DIR, decode_dataset, decode_image
from cellseg.errors import DataError
from cellseg.io import read_labels
from cellseg.sources.kaggle import read_kaggle


def _rows(*masks: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"row": range(2, 2 + len(masks)), "annotation": [rle.encode(m) for m in masks]})


def test_overlap_goes_to_the_smaller_instance() -> None:
    big = np.zeros((6, 8), dtype=bool)
    big[1:5, 1:7] = True  # 24 px
    small = np.zeros_like(big)
    small[0:3, 5:8] = True  # 9 px, 4 of them inside big
    same = np.zeros_like(big)
    same[5, 0:4] = True  # 4 px, touches nothing
    decoded = decode_image(_rows(big, small, same), big.shape, Path("x.csv"))
    labels = decoded.labels
    assert labels.dtype == np.uint16
    assert (labels == 2).sum() == 9 and (labels == 1).sum() == 20 and (labels == 3).sum() == 4
    assert decoded.overlap_pixels == 4
    table = decoded.instances
    assert table["area"].tolist() == [24, 9, 4]
    assert table["overlap_lost"].tolist() == [4, 0, 0]
    assert table[["x0", "y0", "x1", "y1"]].values.tolist() == [[1, 1, 7, 5], [5, 0, 8, 3], [0, 5, 4, 6]]


def test_equal_areas_keep_the_earlier_row_on_top() -> None:
    a = np.zeros((4, 4), dtype=bool)
    a[0:2, 0:2] = True
    b = np.zeros_like(a)
    b[1:3, 1:3] = True
    labels = decode_image(_rows(a, b), a.shape, Path("x.csv")).labels
    assert labels[1, 1] == 1


def test_malformed_rle_names_file_and_row() -> None:
    rows = pd.DataFrame({"row": [2, 3], "annotation": ["1 2", "5 2 1 1"]})
    with pytest.raises(DataError, match=r"x.csv: row 3: malformed RLE: token 3: run starting at 1 is out of order"):
        decode_image(rows, (4, 4), Path("x.csv"))
    with pytest.raises(DataError, match=r"row 2: malformed RLE: .*runs past the end of the image \(16 pixels\)"):
        decode_image(pd.DataFrame({"row": [2], "annotation": ["10 9"]}), (4, 4), Path("x.csv"))


def test_real_sample(real_dir: Path, tmp_path: Path) -> None:
    images = decode_dataset(read_kaggle(real_dir), tmp_path / "out")
    assert images.loc[0, "n_cells"] == 395
    assert images.loc[0, "overlap_pixels"] == 3354  # as counted in shared/real/SOURCES.md
    labels = read_labels(tmp_path / "out" / LABELS_DIR / "0030fd0e6378.png")
    assert labels.shape == (520, 704) and labels.dtype == np.uint16
    instances = pd.read_parquet(tmp_path / "out" / INSTANCES_TABLE)
    assert len(instances) == 395 and instances["cell_type"].eq("shsy5y").all()
    assert instances["area"].min() == 46 and instances["area"].max() == 757 and instances["area"].median() == 268
    # each instance's own RLE survives unchanged; its visible pixels are its mask minus what it lost
    for inst in instances.itertuples():
        mask = rle.decode(inst.annotation, (520, 704))
        assert ((labels == inst.label) & ~mask).sum() == 0
        assert (labels == inst.label).sum() == inst.area - inst.overlap_lost
        ys, xs = np.nonzero(mask)
        assert (inst.x0, inst.y0, inst.x1, inst.y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert pd.read_parquet(tmp_path / "out" / IMAGES_TABLE).equals(images)


def test_bad_rle_leaves_previous_output_intact(make_kaggle, tmp_path: Path) -> None:
    root = make_kaggle()
    out = tmp_path / "decoded"
    decode_dataset(read_kaggle(root), out)
    before = sorted(p.name for p in (out / LABELS_DIR).iterdir())
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[7, "annotation"] = "3 4 1 1"
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv: row 9: malformed RLE"):
        decode_dataset(read_kaggle(root), out)
    assert sorted(p.name for p in (out / LABELS_DIR).iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoded", "kaggle"]


def test_truncated_image_is_caught(make_kaggle, tmp_path: Path) -> None:
    root = make_kaggle()
    path = sorted((root / "train").glob("*.png"))[2]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=f"{path}: not a readable image"):
        decode_dataset(read_kaggle(root), tmp_path / "decoded")
    assert not (tmp_path / "decoded").exists()
