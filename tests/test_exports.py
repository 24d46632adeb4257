"""What ``cellseg predict`` writes per image: label TIFFs, overlays, ImageJ ROI zips, measurements and summaries
(:mod:`cellseg.exports`, :mod:`cellseg.measure`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import roifile
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.draw import ellipse, polygon2mask
from skimage.measure import label, regionprops_table
from skimage.segmentation import relabel_sequential

from cellseg.celltypes import CELL_TYPES
from cellseg.exports import COLOURS, LEGEND_HEIGHT, cell_polygons, write_label_tiff, write_overlay, write_rois
from cellseg.instances import Instances
from cellseg.measure import PROPERTIES, cell_measurements, image_summary


@pytest.fixture(scope="module")
def cells() -> Instances:
    """300 overlapping ellipses of every orientation painted over each other: cells of varied shapes, some
    with holes or in pieces, with random types and confidences."""
    rng = np.random.default_rng(1)
    labels = np.zeros((520, 704), np.uint16)
    for k in range(1, 301):
        rows, cols = ellipse(rng.integers(0, 520), rng.integers(0, 704), rng.integers(3, 25), rng.integers(3, 25),
                             shape=labels.shape, rotation=rng.uniform(0, np.pi))
        labels[rows, cols] = k
    labels = relabel_sequential(labels)[0].astype(np.uint16)
    n = int(labels.max())
    return Instances(labels, rng.integers(1, 4, n), rng.uniform(0, 1, n).astype(np.float32), 1)


def test_label_tiff_is_uint16_then_uint32(tmp_path: Path, cells: Instances) -> None:
    write_label_tiff(tmp_path / "a.tif", cells.labels)
    read = tifffile.imread(tmp_path / "a.tif")
    assert read.dtype == np.uint16 and np.array_equal(read, cells.labels)
    many = np.arange(70_000, dtype=np.uint32).reshape(280, 250)
    write_label_tiff(tmp_path / "many.tif", many)
    assert tifffile.imread(tmp_path / "many.tif").dtype == np.uint32
    assert np.array_equal(tifffile.imread(tmp_path / "many.tif"), many)


def test_rois_read_back_to_the_same_polygons_and_the_cells(tmp_path: Path, cells: Instances) -> None:
    """Each ROI reads back (roifile) to the polygon written, named label-type-confidence; filled, the polygon
    is the cell's pixels (holes filled) for every cell in one piece."""
    write_rois(tmp_path / "a.zip", cells)
    rois = roifile.roiread(tmp_path / "a.zip")
    polygons = cell_polygons(cells.labels)
    assert len(rois) == len(cells) == len(polygons)
    whole = 0
    for k, roi in enumerate(rois, start=1):
        assert roi.name == f"{k:04d}-{CELL_TYPES[cells.classes[k - 1] - 1]}-{cells.scores[k - 1]:.2f}"
        assert np.allclose(roi.coordinates(), polygons[k])
        mask = cells.labels == k
        if label(mask, connectivity=1).max() == 1:
            filled = polygon2mask(mask.shape, roi.coordinates()[:, ::-1] - 0.5)  # ImageJ (x, y) → pixel centres
            assert np.array_equal(filled, ndimage.binary_fill_holes(mask, np.ones((3, 3)))), k  # background: 8-connected
            whole += 1
    assert whole > 250
    write_rois(tmp_path / "none.zip", Instances(np.zeros((4, 4), np.uint16), np.zeros(0, int), np.zeros(0)))
    assert not (tmp_path / "none.zip").exists()


def test_overlay_colours_cells_by_type_and_confidence(tmp_path: Path, cells: Instances) -> None:
    image = np.full(cells.labels.shape, 100, np.uint8)
    write_overlay(tmp_path / "a.png", image, cells)
    overlay = np.asarray(Image.open(tmp_path / "a.png"))
    assert overlay.shape == (cells.labels.shape[0] + LEGEND_HEIGHT, cells.labels.shape[1], 3)
    assert np.array_equal(overlay[: cells.labels.shape[0]][cells.labels == 0][:, 0], np.full((cells.labels == 0).sum(), 100))
    k = int(np.argmax(cells.scores))  # the most confident cell: its centre is strongly tinted with its colour
    centre = tuple(np.round(ndimage.center_of_mass(cells.labels == k + 1)).astype(int))
    if cells.labels[centre] == k + 1:
        expected = 0.5 * cells.scores[k] * COLOURS[cells.classes[k]] + (1 - 0.5 * cells.scores[k]) * 100
        assert np.abs(overlay[centre].astype(float) - expected).max() <= 1


def test_measurements_are_regionprops_of_the_label_image(cells: Instances) -> None:
    grey = np.random.default_rng(2).integers(0, 4096, cells.labels.shape).astype(np.uint16)  # a 12-bit image
    table = cell_measurements("img", cells, grey)
    expected = pd.DataFrame(regionprops_table(cells.labels, intensity_image=grey, properties=PROPERTIES))
    assert len(table) == len(cells) and (table["image"] == "img").all()
    assert np.allclose(table["area"], expected["area"]) and np.allclose(table["perimeter"], expected["perimeter"])
    assert np.allclose(table["intensity_mean"], expected["intensity_mean"])
    assert np.allclose(table[["centroid_y", "centroid_x"]], expected[["centroid-0", "centroid-1"]])
    for column in ("eccentricity", "solidity", "axis_major_length", "axis_minor_length"):
        assert np.allclose(table[column], expected[column])
    assert table["cell_type"].tolist() == [CELL_TYPES[c - 1] for c in cells.classes]
    assert np.allclose(table["confidence"], cells.scores)


def test_image_summary_counts_types_confluence_and_area(cells: Instances) -> None:
    row = image_summary("img", cells)
    assert row["cells"] == len(cells) == sum(row[f"cells_{name}"] for name in CELL_TYPES)
    assert row["confluence_pct"] == pytest.approx(100 * (cells.labels > 0).mean())
    assert row["mean_cell_area"] == pytest.approx((cells.labels > 0).sum() / len(cells))
    assert row["cell_type"] == "shsy5y" and (row["height"], row["width"]) == cells.labels.shape
    empty = image_summary("none", Instances(np.zeros((4, 4), np.uint16), np.zeros(0, int), np.zeros(0)))
    assert empty["cells"] == 0 and empty["confluence_pct"] == 0 and np.isnan(empty["mean_cell_area"])
