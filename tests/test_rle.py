"""The RLE codec: the competition's convention, strictness and round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from cellseg import rle
from cellseg.io import read_gray


def test_known_values() -> None:
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1:3] = True  # pixels 2, 3
    mask[1, 3] = mask[2, 0] = True  # pixels 8, 9: one run across the row boundary (row-major)
    assert rle.encode(mask) == "2 2 8 2"
    assert np.array_equal(rle.decode("2 2 8 2", (3, 4)), mask)
    assert rle.pixels("2 2 8 2", (3, 4)).tolist() == [1, 2, 7, 8]


def test_empty_string_is_empty_mask() -> None:
    assert not rle.decode("", (5, 6)).any()
    assert not rle.decode("   ", (5, 6)).any()
    assert rle.encode(np.zeros((5, 6), dtype=bool)) == ""


def test_touching_runs_are_accepted() -> None:
    assert rle.decode("1 2 3 2", (1, 6)).tolist() == [[True, True, True, True, False, False]]


def test_full_image_and_last_pixel() -> None:
    assert rle.decode("1 12", (3, 4)).all()
    assert rle.decode("12 1", (3, 4))[2, 3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1", "odd number of tokens"),
        ("1 2 3", "odd number of tokens"),
        ("a 2", "token 1 ('a') is not an integer"),
        ("1 2.5", "token 2 ('2.5') is not an integer"),
        ("1 2 3 x", "token 4 ('x') is not an integer"),
        ("0 3", "token 1: start 0 is below 1"),
        ("-4 3", "token 1: start -4 is below 1"),
        ("3 0", "token 2: length 0 is not positive"),
        ("1 2 5 -1", "token 4: length -1 is not positive"),
        ("11 3", "runs past the end of the image (12 pixels)"),
        ("13 1", "runs past the end of the image"),
        ("5 2 1 2", "token 3: run starting at 1 is out of order"),
        ("1 4 3 2", "token 3: run starting at 3 is out of order or overlaps"),
        ("99999999999999999999999 1", "not an integer"),
    ],
)
def test_malformed_rle_is_rejected(text: str, message: str) -> None:
    with pytest.raises(rle.RLEError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        rle.decode(text, (3, 4))
    assert isinstance(info.value, ValueError)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))))
def test_round_trip_random_masks(mask: np.ndarray) -> None:
    text = rle.encode(mask)
    assert np.array_equal(rle.decode(text, mask.shape), mask)
    assert np.array_equal(rle.pixels(text, mask.shape), np.flatnonzero(mask))


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 5)))
def test_encode_labels_is_encode_of_each_label(labels: np.ndarray) -> None:
    """One string per label 1..max, each what :func:`rle.encode` gives its mask ("" for a label absent)."""
    assert rle.encode_labels(labels) == [rle.encode(labels == k) for k in range(1, int(labels.max()) + 1)]


def test_real_annotations_round_trip_exactly(real_dir) -> None:
    table = pd.read_csv(real_dir / "train.csv")
    for row in table.itertuples():
        mask = rle.decode(row.annotation, (row.height, row.width))
        assert mask.any()
        assert rle.encode(mask) == row.annotation


def test_real_masks_sit_on_cells_row_major(real_dir) -> None:
    """Row-major decoding gives compact one-piece cells; column-major would give scattered stripes."""
    table = pd.read_csv(real_dir / "train.csv")
    image = read_gray(real_dir / "train" / f"{table.id[0]}.png").astype(float)
    assert image.shape == (table.height[0], table.width[0]) == (520, 704)
    one_piece = transposed_one_piece = 0
    inside, halo = [], []
    for text in table.annotation:
        mask = rle.decode(text, (520, 704))
        one_piece += ndimage.label(mask)[1] == 1
        transposed = rle.decode(text, (704, 520)).T  # the column-major reading of the same runs
        transposed_one_piece += ndimage.label(transposed)[1] == 1
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        inside.append(image[mask].std())
        halo.append(image[ring].mean() - image.mean())
    assert one_piece >= 0.95 * len(table)
    assert transposed_one_piece <= 0.05 * len(table)
    # Phase contrast: the bright halo ring around each cell is brighter than the image on average.
    assert np.mean(halo) > 0
