"""Files that image-analysis tools open (Fiji/ImageJ, napari, QuPath, CellProfiler): a label TIFF, an outline
overlay and an ImageJ ROI zip per image. Each writer writes one file at ``path`` (not atomically: call it
inside an atomic directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import roifile
import tifffile
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.measure import find_contours
from skimage.segmentation import find_boundaries

from cellseg.celltypes import CELL_TYPES, UNKNOWN_CLASS, cell_type
from cellseg.instances import MAX_LABEL, Instances

OUTPUTS = {  # what ``cellseg predict`` writes (each behind a flag, all on by default): name → what it is
    "labels": "labels/<image>.tif: the label image (uint16; uint32 past 65,535 cells)",
    "overlay": "overlays/<image>.png: cells filled with their type's colour, more opaque the more confident",
    "rois": "rois/<image>.zip: an ImageJ/Fiji ROI per cell, named label-type-confidence",
    "measurements": "cells.csv: per cell area, perimeter, shape, mean intensity, centroid, type, confidence",
    "summary": "images.csv: per image cells per type, confluence %, mean cell area",
    "coco": "predictions.json: COCO results with each cell's type and score",
    "submission": "submission.csv: the Kaggle format",
}
# One colour per category id (unknown, shsy5y, astro, cort): matplotlib's tab10 grey, orange, blue, green.
COLOURS = np.array([(127, 127, 127), (255, 127, 14), (31, 119, 180), (44, 160, 44)], np.uint8)
FILL_OPACITY = 0.5  # a cell's fill is its type's colour at this opacity times its confidence
OUTLINE_LIGHTER = 0.6  # its outline is that colour this much of the way to white, so touching cells stand apart
LEGEND_HEIGHT = 16


def write_label_tiff(path: Path, labels: np.ndarray) -> None:
    """The label image as an uncompressed TIFF (0 background, cell k at k): uint16, or uint32 when it holds
    more than 65,535 cells."""
    dtype = np.uint16 if int(labels.max(initial=0)) <= MAX_LABEL else np.uint32
    tifffile.imwrite(path, labels.astype(dtype, copy=False), photometric="minisblack")


def write_overlay(path: Path, image: np.ndarray, instances: Instances) -> None:
    """A PNG of the uint8 grey ``image`` with each cell outlined in a light tint of its type's colour
    (:data:`COLOURS`) and filled with that colour at an opacity that grows with its confidence; a legend strip below names the colours and
    counts the cells of each type."""
    labels = instances.labels
    categories = np.concatenate([[UNKNOWN_CLASS], instances.classes]).astype(np.intp)
    confidence = np.concatenate([[0.0], instances.scores]).astype(np.float32)
    colour = COLOURS[categories[labels]].astype(np.float32)
    alpha = (FILL_OPACITY * confidence[labels])[..., None]
    rgb = (1 - alpha) * image[..., None].astype(np.float32) + alpha * colour
    outline = find_boundaries(labels, mode="inner")
    rgb[outline] = colour[outline] + OUTLINE_LIGHTER * (255 - colour[outline])
    canvas = Image.new("RGB", (labels.shape[1], labels.shape[0] + LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(np.rint(rgb).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 4
    for category, name in enumerate(CELL_TYPES, start=1):
        count = int((instances.classes == category).sum())
        draw.rectangle([x, labels.shape[0] + 4, x + 8, labels.shape[0] + 12], fill=tuple(COLOURS[category].tolist()))
        text = f"{name}: {count}"
        draw.text((x + 12, labels.shape[0] + 2), text, fill=(255, 255, 255))
        x += 24 + int(draw.textlength(text))
    draw.text((x, labels.shape[0] + 2), "fill opacity: confidence", fill=(200, 200, 200))
    canvas.save(path, compress_level=1)


def cell_polygons(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each cell's outline as a polygon of (x, y) points in ImageJ's pixel coordinates (pixel (x, y) covers
    [x, x+1) × [y, y+1)), keyed by label: the longest iso-line at 0.5 of its mask (scikit-image's marching
    squares), which runs along the middle of the pixel edges between the cell and the rest, so the pixels whose
    centres it encloses are the cell's. A cell in several pieces keeps the outline of its largest; holes are
    not outlined."""
    polygons = {}
    for k, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        mask = np.pad(labels[window] == k, 1)
        contour = max(find_contours(mask.astype(np.uint8), 0.5), key=len)
        rows = contour[:, 0] - 1 + window[0].start + 0.5
        cols = contour[:, 1] - 1 + window[1].start + 0.5
        polygons[k] = np.stack([cols, rows], axis=1)[:-1]  # find_contours closes the loop: drop the repeat
    return polygons


def roi_name(label: int, instances: Instances) -> str:
    """A cell's ROI name: its label, predicted type and confidence, e.g. ``0007-cort-0.91``."""
    name = cell_type(int(instances.classes[label - 1])) or "unknown"
    return f"{label:04d}-{name}-{instances.scores[label - 1]:.2f}"


def write_rois(path: Path, instances: Instances) -> None:
    """An ImageJ/Fiji ROI zip (RoiManager: File > Open) with one polygon ROI per cell (:func:`cell_polygons`),
    named by :func:`roi_name`; an image without cells gets no file."""
    polygons = cell_polygons(instances.labels)
    rois = [roifile.ImagejRoi.frompoints(points, name=roi_name(k, instances)) for k, points in polygons.items()]
    if rois:
        roifile.roiwrite(path, rois, mode="w")
