"""K-fold train/validation split, stratified by cell type and grouped by sample (plate well/time series)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cellseg.errors import DataError

log = logging.getLogger(__name__)


def sample_groups(images: pd.DataFrame) -> pd.Series:
    """Each image's group: its ``sample_id``, or, where that is blank, the image alone (with one warning)."""
    sample_id = images["sample_id"].fillna("").astype(str)
    blank = sample_id.str.strip() == ""
    if blank.any():
        log.warning(
            "split: %d of %d image(s) have no sample_id: each is its own group (images of one well may then "
            "fall on both sides of the split)", int(blank.sum()), len(images),
        )
    return sample_id.where(~blank, "image:" + images["image_id"].astype(str)).rename("group")


def assign_folds(images: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Return each image's fold (indexed like ``images``); images of one ``sample_id`` share a fold (an image
    without one is a group of its own, :func:`sample_groups`).

    Per cell type, that type's samples are shuffled (``seed``), then taken largest first and each given to
    the fold holding the fewest images of that type so far: every fold gets a near-equal share of every
    type (each type with at least ``n_folds`` samples appears in every fold).
    """
    groups = sample_groups(images)
    n_groups = groups.nunique()
    if n_groups < n_folds:
        raise DataError(
            f"split: {n_groups} distinct sample_id(s) cannot fill {n_folds} folds without a sample straddling "
            "train and validation; lower split.n_folds or use more images"
        )
    rng = np.random.default_rng(seed)
    grouped = images.assign(group=groups).groupby("group", sort=True)
    samples = grouped.agg(cell_type=("cell_type", "first"), size=("image_id", "size"))
    fold_of_sample: dict[str, int] = {}
    totals = np.zeros(n_folds, dtype=np.int64)
    for _, group in samples.groupby("cell_type", sort=True):
        group = group.iloc[rng.permutation(len(group))].sort_values("size", ascending=False, kind="stable")
        per_type = np.zeros(n_folds, dtype=np.int64)
        for sample_id, size in group["size"].items():
            fold = int(np.lexsort((totals, per_type))[0])  # fewest of this type, then fewest overall
            fold_of_sample[sample_id] = fold
            per_type[fold] += size
            totals[fold] += size
    return groups.map(fold_of_sample).astype(np.int64).rename("fold")


def make_split(images: pd.DataFrame, n_folds: int, fold: int, seed: int) -> dict:
    """The split as a JSON-ready dict: params, sorted ``train``/``val`` image ids and every image's fold."""
    folds = assign_folds(images, n_folds, seed)
    ids = images["image_id"]
    val = sorted(ids[folds == fold])
    train = sorted(ids[folds != fold])
    if not val or not train:
        raise DataError(f"split: fold {fold} of {n_folds} leaves an empty train or validation set")
    counts = {
        name: images[ids.isin(part)]["cell_type"].value_counts().sort_index().to_dict()
        for name, part in (("train", train), ("val", val))
    }
    return {
        "n_folds": n_folds,
        "fold": fold,
        "seed": seed,
        "counts": counts,
        "train": train,
        "val": val,
        "folds": dict(zip(ids, map(int, folds))),
    }
