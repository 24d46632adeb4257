"""Training patch index: square windows centred (with jitter) on annotated cells, plus background windows.

The index is a table, not pixels: one row per window (``image_id, x0, y0, size, cell_type, label``), cropped
later from images held in memory (:class:`cellseg.data.PatchDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellseg.errors import DataError, ParamsError

PATCH_COLUMNS: tuple[str, ...] = ("image_id", "x0", "y0", "size", "cell_type", "label")
_INSTANCE_COLUMNS = ("image_id", "label", "x0", "y0", "x1", "y1")
_IMAGE_COLUMNS = ("image_id", "width", "height", "cell_type")


def sample_patches(
    instances: pd.DataFrame,
    images: pd.DataFrame,
    image_ids: Sequence[str],
    *,
    size: int,
    jitter: float,
    per_cell: int,
    background_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """Index ``per_cell`` windows per cell of ``image_ids`` plus ``round(background_fraction × that)`` background ones.

    A cell window is centred on the cell's bbox centre pixel, moved by a uniform integer offset in
    ``[-m, m]`` (``m = floor(jitter · size / 2)``) in x and y, then shifted to lie inside the image; with
    ``jitter < 1`` the centre pixel always stays inside the window. Background windows (``label`` 0) lie at
    uniformly random positions in uniformly chosen images. Deterministic per ``seed``.
    """
    frame = _image_frame(images, image_ids)
    too_small = frame[(frame["width"] < size) | (frame["height"] < size)]
    if len(too_small):
        row = too_small.iloc[0]
        raise ParamsError(
            f"patches.size: {size} exceeds image {row['image_id']} ({row['width']}x{row['height']}); "
            f"{len(too_small)} image(s) are smaller than the window"
        )
    rng = np.random.default_rng(seed)
    cells = _cell_windows(instances, frame, size, jitter, per_cell, rng)
    background = _background_windows(frame, size, round(background_fraction * len(cells)), rng)
    return pd.concat([cells, background], ignore_index=True)


def _image_frame(images: pd.DataFrame, image_ids: Sequence[str]) -> pd.DataFrame:
    """The rows of ``images`` for ``image_ids`` (deduplicated, in the order given)."""
    _require_columns(images, _IMAGE_COLUMNS, "images table")
    ids = pd.Index(pd.unique(pd.Series(list(image_ids), dtype=object)))
    table = images.drop_duplicates("image_id").set_index("image_id")
    missing = ids.difference(table.index)
    if len(missing):
        raise DataError(f"images table: {len(missing)} requested image id(s) missing, e.g. {list(missing[:5])}")
    return table.loc[ids, ["width", "height", "cell_type"]].rename_axis("image_id").reset_index()


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}")


def _cell_windows(
    instances: pd.DataFrame, frame: pd.DataFrame, size: int, jitter: float, per_cell: int, rng: np.random.Generator
) -> pd.DataFrame:
    """``per_cell`` jittered windows per instance of the images in ``frame`` (consecutive rows per cell)."""
    _require_columns(instances, _INSTANCE_COLUMNS, "instances table")
    cells = instances[instances["image_id"].isin(frame["image_id"])]
    position = pd.Index(frame["image_id"]).get_indexer(cells["image_id"])
    position = np.repeat(position, per_cell)
    centre_x = np.repeat((cells["x0"].to_numpy(np.int64) + cells["x1"].to_numpy(np.int64) - 1) // 2, per_cell)
    centre_y = np.repeat((cells["y0"].to_numpy(np.int64) + cells["y1"].to_numpy(np.int64) - 1) // 2, per_cell)
    reach = int(np.floor(jitter * size / 2))
    offset = rng.integers(-reach, reach, size=(2, len(position)), endpoint=True)
    width = frame["width"].to_numpy(np.int64)[position]
    height = frame["height"].to_numpy(np.int64)[position]
    return _frame(
        frame["image_id"].to_numpy(object)[position],
        np.clip(centre_x + offset[0] - size // 2, 0, width - size),
        np.clip(centre_y + offset[1] - size // 2, 0, height - size),
        size,
        frame["cell_type"].to_numpy(object)[position],
        np.repeat(cells["label"].to_numpy(np.int64), per_cell),
    )


def _background_windows(frame: pd.DataFrame, size: int, count: int, rng: np.random.Generator) -> pd.DataFrame:
    """``count`` windows at uniform positions in uniformly chosen images of ``frame`` (label 0)."""
    position = rng.integers(0, len(frame), size=count)
    width = frame["width"].to_numpy(np.int64)[position]
    height = frame["height"].to_numpy(np.int64)[position]
    return _frame(
        frame["image_id"].to_numpy(object)[position],
        rng.integers(0, width - size, endpoint=True),
        rng.integers(0, height - size, endpoint=True),
        size,
        frame["cell_type"].to_numpy(object)[position],
        np.zeros(count, dtype=np.int64),
    )


def _frame(
    image_id: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: int, cell_type: np.ndarray, label: np.ndarray
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": image_id,
            "x0": np.asarray(x0, dtype=np.int64),
            "y0": np.asarray(y0, dtype=np.int64),
            "size": np.full(len(image_id), size, dtype=np.int64),
            "cell_type": cell_type,
            "label": label,
        },
        columns=list(PATCH_COLUMNS),
    )
