"""Images of any size: padding, tiles merged without seams, and resizing (:mod:`cellseg.tiling`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from skimage.draw import disk
from skimage.measure import label

from cellseg.celltypes import category_id
from cellseg.instances import IMAGE_SHAPE, MAX_LABEL, Instances
from cellseg.models.unet import UNetPredictor
from cellseg.tiling import merge_tiles, segment_any_size, tile_starts
from helpers.project import project_params
from test_predict import DarkCells

CPU = torch.device("cpu")


class DarkComponents:
    """A stand-in predictor that sees only the competition's image size: each connected dark region is a cell
    (its score falls with its label), the image's class is shsy5y."""

    name = "components"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        found = []
        for image in images:
            self.shapes.append(image.shape)
            labels = label(image < 100).astype(np.uint16)
            n = int(labels.max())
            found.append(Instances(labels, np.full(n, 1), np.linspace(1, 0.5, n, dtype=np.float32), 1))
        return found


def discs(shape: tuple[int, int], count: int, seed: int = 0) -> np.ndarray:
    """A bright image with ``count`` dark discs of radius 3..29 (some touching: blobs up to ~150 pixels)."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, 200, np.uint8)
    for _ in range(count):
        image[disk(tuple(rng.integers(0, shape)), int(rng.integers(3, 30)), shape=shape)] = 50
    return image


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same cells (the same partition of the pixels, in any numbering)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int64), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def test_tiles_cover_the_axis_with_the_overlap_asked() -> None:
    assert tile_starts(520, 520, 192) == [0] and tile_starts(100, 520, 0) == [0]
    for length, tile, overlap in [(2048, 704, 192), (2048, 520, 192), (705, 704, 0), (5000, 520, 260)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert min(tile - np.diff(starts)) >= overlap  # neighbours overlap by at least that
        if len(starts) > 2:  # one tile fewer would not (with 2, one tile could not cover the axis at all)
            assert min(tile - np.diff(np.linspace(0, length - tile, len(starts) - 1))) < overlap


def test_a_tiled_large_image_gives_the_cells_of_one_piece() -> None:
    """Cells no larger than the overlap, many of them across tile borders: the merged tiles hold exactly the
    cells of the whole image, and the predictor only ever sees the competition's size."""
    image = discs((2048, 2048), 600)
    predictor = DarkComponents()
    tiled = segment_any_size(predictor, image, overlap=192)
    whole = label(image < 100)
    assert set(predictor.shapes) == {IMAGE_SHAPE} and len(predictor.shapes) == 24
    assert len(tiled) == int(tiled.labels.max()) == whole.max() > 400
    assert same_cells(whole, tiled.labels)
    assert tiled.classes.tolist() == [1] * len(tiled) and tiled.image_class == 1


def test_tiled_unet_cells_match_the_unet_in_one_piece() -> None:
    """The U-Net's post-processing (watershed, minimum size, confidences) on tiles, merged, gives what it gives
    on the whole 1,600 × 1,800 image at once."""
    image = discs((1600, 1800), 350, seed=1)
    params = project_params("unet", encoder="resnet18", target="boundary")  # DarkCells' three classes
    post = project_params("postprocess.unet", min_size={"default": 20})
    predictor = UNetPredictor(DarkCells("cort"), params, post, CPU)
    (whole,) = predictor.predict([image])
    tiled = segment_any_size(predictor, image, overlap=192, batch_size=3)
    assert len(tiled) == len(whole) > 200 and same_cells(whole.labels, tiled.labels)
    assert set(tiled.classes.tolist()) == {category_id("cort")} and tiled.image_class == category_id("cort")
    assert np.allclose(np.sort(tiled.scores), np.sort(whole.scores))


@pytest.mark.parametrize("shape", [(64, 64), (1, 1), (333, 517), (520, 704), (521, 705), (900, 300)])
def test_small_and_odd_sizes_are_padded_or_tiled_and_cut_back(shape: tuple[int, int]) -> None:
    image = discs((900, 900), 120, seed=2)[: shape[0], : shape[1]]
    predictor = DarkComponents()
    found = segment_any_size(predictor, image)
    assert found.labels.shape == shape and set(predictor.shapes) == {IMAGE_SHAPE}
    whole = label(image < 100)
    assert len(found) == int(found.labels.max()) == whole.max()
    assert same_cells(whole, found.labels)


def test_scale_segments_at_the_competition_size_and_answers_at_the_image_size() -> None:
    """An image at twice the competition's magnification, with ``scale`` 0.5: the predictor sees the cells at
    their trained size, and the labels come back at the image's size, cell for cell."""
    small = discs((520, 704), 60, seed=3)
    large = np.kron(small, np.ones((2, 2), np.uint8))
    predictor = DarkComponents()
    found = segment_any_size(predictor, large, scale=0.5)
    assert found.labels.shape == large.shape and predictor.shapes == [IMAGE_SHAPE]
    expected = label(large < 100)
    assert len(found) == expected.max() and same_cells(expected, found.labels)


def test_merged_labels_widen_to_uint32_past_65535_cells() -> None:
    lattice = np.zeros(IMAGE_SHAPE, np.uint32)
    lattice[::2, ::2] = np.arange(1, lattice[::2, ::2].size + 1).reshape(lattice[::2, ::2].shape)
    n = int(lattice.max())
    found = Instances(lattice, np.full(n, 2), np.ones(n, np.float32), 2)
    merged = merge_tiles([found], [(0, 0)], IMAGE_SHAPE)
    assert n > MAX_LABEL and merged.labels.dtype == np.uint32 and len(merged) == n
    assert same_cells(lattice, merged.labels)


def test_an_overlap_beyond_half_a_tile_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap must be 0..260 pixels"):
        segment_any_size(DarkComponents(), np.zeros((9, 9), np.uint8), overlap=300)
