"""K-fold split: grouped by sample, stratified by cell type, deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellseg.errors import DataError
from cellseg.split import assign_folds, make_split


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
