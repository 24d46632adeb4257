"""Patch index: counts, bounds, centring, determinism and the window-size check (the params' own ranges are
config's: tests/test_params.py)."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, decode_dataset
from cellseg.errors import DataError, ParamsError
from cellseg.patches import PATCH_COLUMNS, sample_patches
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(instances, images) of 6 decoded synthetic images."""
    root = tmp_path_factory.mktemp("patches")
    synthesize(root / "raw", n_images=6, seed=0)
    decode_dataset(load_source("synthetic", root / "raw"), root / "decoded")
    return pd.read_parquet(root / "decoded" / INSTANCES_TABLE), pd.read_parquet(root / "decoded" / IMAGES_TABLE)


def _sample(tables: tuple[pd.DataFrame, pd.DataFrame], ids: list[str], **overrides: object) -> pd.DataFrame:
    params = {"size": 256, "jitter": 0.5, "per_cell": 2, "background_fraction": 0.25, "seed": 0, **overrides}
    return sample_patches(*tables, ids, **params)


def test_counts_images_and_bounds(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    instances, images = tables
    ids = list(images["image_id"][:4])
    patches = _sample(tables, ids)
    n_cells = int(instances["image_id"].isin(ids).sum())
    assert list(patches.columns) == list(PATCH_COLUMNS)
    assert len(patches) == 2 * n_cells + round(0.25 * 2 * n_cells)
    assert (patches["label"] > 0).sum() == 2 * n_cells
    assert set(patches["image_id"]) <= set(ids)
    for column in ("x0", "y0", "size", "label"):
        assert patches[column].dtype == np.int64
    shape = images.set_index("image_id").loc[patches["image_id"]]
    assert (patches["x0"] >= 0).all() and (patches["y0"] >= 0).all()
    assert (patches["x0"].to_numpy() + 256 <= shape["width"].to_numpy()).all()
    assert (patches["y0"].to_numpy() + 256 <= shape["height"].to_numpy()).all()
    assert (patches["cell_type"].to_numpy() == shape["cell_type"].to_numpy()).all()
    per_cell = patches[patches["label"] > 0].groupby(["image_id", "label"]).size()
    assert (per_cell == 2).all() and len(per_cell) == n_cells


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.99])
def test_cell_centre_inside_window(tables: tuple[pd.DataFrame, pd.DataFrame], jitter: float) -> None:
    instances, images = tables
    patches = _sample(tables, list(images["image_id"]), jitter=jitter, size=64, per_cell=3)
    cells = patches[patches["label"] > 0].merge(instances, on=["image_id", "label"], suffixes=("", "_cell"))
    assert len(cells) == 3 * len(instances)
    centre_x = (cells["x0_cell"] + cells["x1"] - 1) // 2
    centre_y = (cells["y0_cell"] + cells["y1"] - 1) // 2
    assert ((cells["x0"] <= centre_x) & (centre_x < cells["x0"] + 64)).all()
    assert ((cells["y0"] <= centre_y) & (centre_y < cells["y0"] + 64)).all()


def test_deterministic_per_seed(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ids = list(tables[1]["image_id"])
    first = _sample(tables, ids, seed=3)
    pd.testing.assert_frame_equal(first, _sample(tables, ids, seed=3))
    assert not first.equals(_sample(tables, ids, seed=4))


def test_no_background_and_no_images(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    patches = _sample(tables, list(tables[1]["image_id"]), jitter=0.0, background_fraction=0.0, per_cell=1)
    assert (patches["label"] > 0).all()
    assert _sample(tables, [], background_fraction=1.0).empty


def test_window_larger_than_image(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    with pytest.raises(ParamsError, match=r"patches\.size: 544 exceeds image"):
        _sample(tables, list(tables[1]["image_id"]), size=544)


def test_unknown_image_id(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    with pytest.raises(DataError, match="missing.*nope"):
        _sample(tables, ["nope"])


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(32, 300),
    height=st.integers(32, 300),
    boxes=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=20),
    jitter=st.floats(0, 0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_windows_inside_and_centred_property(
    width: int, height: int, boxes: list[tuple[float, ...]], jitter: float, seed: int
) -> None:
    images = pd.DataFrame({"image_id": ["a"], "width": [width], "height": [height], "cell_type": ["astro"]})
    x = np.sort(np.array([[b[0], b[1]] for b in boxes]).reshape(-1, 2) * (width - 1), axis=1).astype(int)
    y = np.sort(np.array([[b[2], b[3]] for b in boxes]).reshape(-1, 2) * (height - 1), axis=1).astype(int)
    instances = pd.DataFrame(
        {"image_id": "a", "label": np.arange(1, len(boxes) + 1), "x0": x[:, 0], "x1": x[:, 1] + 1,
         "y0": y[:, 0], "y1": y[:, 1] + 1}
    )
    patches = sample_patches(instances, images, ["a"], size=32, jitter=jitter, per_cell=1, background_fraction=0.5,
                             seed=seed)
    assert ((patches["x0"] >= 0) & (patches["x0"] + 32 <= width)).all()
    assert ((patches["y0"] >= 0) & (patches["y0"] + 32 <= height)).all()
    cells = patches.iloc[: len(boxes)]
    centre_x, centre_y = (x[:, 0] + x[:, 1]) // 2, (y[:, 0] + y[:, 1]) // 2
    assert ((cells["x0"] <= centre_x) & (centre_x < cells["x0"] + 32)).all()
    assert ((cells["y0"] <= centre_y) & (centre_y < cells["y0"] + 32)).all()
