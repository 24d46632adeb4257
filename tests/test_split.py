"""K-fold split: grouped by sample (an image without one alone), stratified by cell type, deterministic."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellseg.errors import DataError
from cellseg.sources.kaggle import read_kaggle
from cellseg.split import assign_folds, make_split, sample_groups

CELL_TYPES = {"shsy5y", "astro", "cort"}


def _images(n_samples_per_type: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for cell_type in ("shsy5y", "astro", "cort"):
        for s in range(n_samples_per_type):
            for t in range(int(rng.integers(1, 5))):
                rows.append({"image_id": f"{cell_type}{s}_{t}", "cell_type": cell_type, "sample_id": f"{cell_type}-{s}"})
    return pd.DataFrame(rows)


def test_no_sample_straddles_and_every_fold_is_stratified() -> None:
    images = _images()
    folds = assign_folds(images, n_folds=3, seed=0)
    assert set(folds) == {0, 1, 2}
    assert (images.assign(fold=folds).groupby("sample_id")["fold"].nunique() == 1).all()
    for fold in range(3):
        assert set(images[folds == fold]["cell_type"]) == {"shsy5y", "astro", "cort"}


def test_split_is_deterministic_and_complete() -> None:
    images = _images()
    split = make_split(images, n_folds=3, fold=1, seed=7)
    assert split == make_split(images, n_folds=3, fold=1, seed=7)
    assert set(split["train"]).isdisjoint(split["val"])
    assert sorted(split["train"] + split["val"]) == sorted(images["image_id"])
    assert split["val"] == sorted(i for i, f in split["folds"].items() if f == 1)
    assert sum(split["counts"]["val"].values()) == len(split["val"])
    assert make_split(images, 3, 1, seed=8)["folds"] != split["folds"]


def test_too_few_samples_for_the_folds() -> None:
    with pytest.raises(DataError, match="3 distinct sample_id.*cannot fill 4 folds"):
        assign_folds(_images(1), n_folds=4, seed=0)


def _split_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cellseg.split" and r.levelno == logging.WARNING]


def test_blank_sample_id_is_a_group_of_its_own(caplog: pytest.LogCaptureFixture) -> None:
    images = _images()
    blank = images["cell_type"] == "astro"
    images.loc[blank, "sample_id"] = ""
    images.loc[images.index[blank][0], "sample_id"] = None  # missing, as after a parquet round trip of nulls
    with caplog.at_level(logging.WARNING, logger="cellseg.split"):
        groups = sample_groups(images)
    assert groups.index.equals(images.index)
    assert groups[blank].nunique() == blank.sum()  # every blank image alone
    assert not groups[blank].isin(images["sample_id"]).any()
    assert groups[~blank].equals(images["sample_id"][~blank].rename("group"))  # the others keep their sample
    (message,) = _split_warnings(caplog)
    assert f"{blank.sum()} of {len(images)} image(s) have no sample_id" in message


def test_split_with_blank_sample_ids(caplog: pytest.LogCaptureFixture) -> None:
    images = _images(n_samples_per_type=2)
    blank = images["cell_type"] == "cort"
    images.loc[blank, "sample_id"] = " "
    with caplog.at_level(logging.WARNING, logger="cellseg.split"):
        split = make_split(images, n_folds=2, fold=0, seed=0)
    assert len(_split_warnings(caplog)) == 1
    folds = images.assign(fold=images["image_id"].map(split["folds"]))
    assert (folds[~blank].groupby("sample_id")["fold"].nunique() == 1).all()
    assert folds[blank]["fold"].nunique() == 2  # lone images are spread over the folds
    assert set(split["counts"]["train"]) == set(split["counts"]["val"]) == CELL_TYPES


def test_no_warning_when_every_image_has_a_sample(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cellseg.split"):
        make_split(_images(), n_folds=3, fold=0, seed=0)
    assert _split_warnings(caplog) == []


def test_split_of_the_real_training_set(sartorius_dir: Path) -> None:
    """360 of the 361 real images have no sample_id: the split still gives every cell type to both sides."""
    images = read_kaggle(sartorius_dir).images
    split = make_split(images, 4, 1, 0)
    assert set(split["counts"]["train"]) == set(split["counts"]["val"]) == CELL_TYPES
    assert len(split["train"]) + len(split["val"]) == 361
    assert 80 <= len(split["val"]) <= 100  # about a quarter
