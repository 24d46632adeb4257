"""Segmenting an image of any size at the size and scale the models were trained on.

The models were trained on the competition's 704×520 images (Mask R-CNN even resizes what it is given to that
size), so :func:`segment_any_size` hands a predictor nothing else:

* an image smaller than :data:`~cellseg.instances.IMAGE_SHAPE` in a dimension is padded to it with its median
  grey level (the background of a phase-contrast image), and the padding cut off the labels after;
* a larger one is cut into overlapping tiles of that size, evenly spaced, that overlap by at least
  ``overlap`` pixels. Each tile's cells are then merged into one label image (:func:`merge_tiles`), so that a
  cell crossing a tile border is one cell, not two halves;
* with ``scale``, the image is first resized by that factor (so that its cells have the competition's size in
  pixels) and the labels brought back to the image's own size (nearest neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential
from skimage.transform import rescale, resize

from cellseg.instances import IMAGE_SHAPE, MAX_LABEL, Instances, Predictor, majority_class

MAX_OVERLAP = min(IMAGE_SHAPE) // 2  # tiles then still advance by half their height


@dataclass(frozen=True)
class _Candidate:
    """One cell of one tile, placed in the whole image: ``window`` (its bounding box there), ``mask`` (within
    it), ``cut`` (it touches a tile border inside the image, so another tile may hold it whole) and ``off_core``
    (its centre lies outside the tile's share of the image)."""

    window: tuple[slice, slice]
    mask: np.ndarray
    category: int
    score: float
    cut: bool
    off_core: bool


def segment_any_size(
    predictor: Predictor, image: np.ndarray, *, scale: float = 1.0, overlap: int = 192, batch_size: int = 4
) -> Instances:
    """The instances of a uint8 H×W image of any size (module docstring); ``batch_size`` tiles go through the
    predictor at once."""
    if not 0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap must be 0..{MAX_OVERLAP} pixels, got {overlap}")
    if scale == 1:
        return _tiled(predictor, image, overlap, batch_size)
    resized = np.rint(rescale(image, scale, order=1, preserve_range=True, anti_aliasing=scale < 1))
    found = _tiled(predictor, np.clip(resized, 0, 255).astype(np.uint8), overlap, batch_size)
    labels = resize(found.labels, image.shape, order=0, preserve_range=True, anti_aliasing=False)
    return _kept(found, labels.astype(found.labels.dtype))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start along an axis of ``length`` ≥ ``tile`` pixels: the fewest, evenly
    spaced, that cover it with neighbours overlapping by at least ``overlap`` pixels."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return np.linspace(0, length - tile, count).round().astype(int).tolist()


def merge_tiles(
    found: Sequence[Instances], origins: Sequence[tuple[int, int]], shape: tuple[int, int]
) -> Instances:
    """One label image of ``shape`` from the instances ``found`` in tiles whose top-left corners are
    ``origins`` (all of one size, on the grid of :func:`tile_starts`).

    Every cell of every tile is a candidate. They are placed one by one, best first: whole cells before cells
    cut by a tile border, then cells whose centre lies in the tile's own share of the image (the part nearer
    to it than to any other tile), then by score. A candidate is dropped when more than half of it is taken
    already (it is the same cell, seen by another tile); otherwise it gets its pixels not yet taken. A cell no
    larger than the overlap thus comes whole from a tile that holds all of it.
    """
    tile = found[0].labels.shape
    starts = [sorted({origin[axis] for origin in origins}) for axis in (0, 1)]
    cores = [_core_bounds(axis_starts, tile[axis], shape[axis]) for axis, axis_starts in enumerate(starts)]
    candidates = [
        candidate
        for instances, origin in zip(found, origins)
        for candidate in _candidates(instances, origin, shape, starts, cores)
    ]
    candidates.sort(key=lambda c: (c.cut, c.off_core, -c.score))
    labels = np.zeros(shape, np.uint32)
    categories, scores = [], []
    for candidate in candidates:
        region = labels[candidate.window]
        own = candidate.mask & (region == 0)
        if 2 * own.sum() < candidate.mask.sum():
            continue
        region[own] = len(scores) + 1
        categories.append(candidate.category)
        scores.append(candidate.score)
    classes = np.array(categories, np.int64)
    image_class = majority_class(classes) if len(classes) else majority_class(np.array([f.image_class for f in found]))
    dtype = np.uint16 if len(scores) <= MAX_LABEL else np.uint32
    return Instances(labels.astype(dtype), classes, np.array(scores, np.float32), image_class)


def _tiled(predictor: Predictor, image: np.ndarray, overlap: int, batch_size: int) -> Instances:
    """:func:`segment_any_size` without the resizing."""
    height, width = image.shape
    padded = np.pad(
        image, [(0, max(0, IMAGE_SHAPE[0] - height)), (0, max(0, IMAGE_SHAPE[1] - width))],
        constant_values=np.median(image).astype(np.uint8),
    )
    origins = [
        (y, x)
        for y in tile_starts(padded.shape[0], IMAGE_SHAPE[0], overlap)
        for x in tile_starts(padded.shape[1], IMAGE_SHAPE[1], overlap)
    ]
    found: list[Instances] = []
    for first in range(0, len(origins), batch_size):
        found += predictor.predict(
            [padded[y : y + IMAGE_SHAPE[0], x : x + IMAGE_SHAPE[1]] for y, x in origins[first : first + batch_size]]
        )
    whole = found[0] if len(found) == 1 else merge_tiles(found, origins, padded.shape)
    return whole if padded.shape == image.shape else _kept(whole, whole.labels[:height, :width])


def _kept(found: Instances, labels: np.ndarray) -> Instances:
    """``found`` with its labels replaced by ``labels`` (cut or resized from them): the instances still there,
    numbered 1..n in their order."""
    relabelled, forward, _ = relabel_sequential(labels)  # keeps the order of the labels
    kept = forward.in_values[forward.in_values > 0].astype(np.int64) - 1
    return Instances(relabelled.astype(labels.dtype, copy=False), found.classes[kept], found.scores[kept], found.image_class)


def _core_bounds(starts: list[int], tile: int, length: int) -> list[int]:
    """The bounds of each tile's own share of an axis: the middles of the overlaps, with 0 and ``length``."""
    middles = [(start + previous + tile) // 2 for previous, start in zip(starts, starts[1:])]
    return [0, *middles, length]


def _candidates(
    instances: Instances, origin: tuple[int, int], shape: tuple[int, int], starts: list[list[int]],
    cores: list[list[int]],
) -> list[_Candidate]:
    """The cells of one tile as :class:`_Candidate` of the whole image."""
    tile = instances.labels.shape
    index = [starts[axis].index(origin[axis]) for axis in (0, 1)]
    candidates = []
    for k, window in enumerate(ndimage.find_objects(instances.labels)):
        if window is None:
            continue
        placed = tuple(slice(s.start + o, s.stop + o) for s, o in zip(window, origin))
        cut = any(
            (s.start == 0 and o > 0) or (s.stop == t and o + t < n)
            for s, o, t, n in zip(window, origin, tile, shape)
        )
        centre = [(s.start + s.stop) / 2 for s in placed]
        off_core = any(
            not core[i] <= c < core[i + 1] for c, core, i in zip(centre, cores, index)
        )
        candidates.append(_Candidate(
            placed, instances.labels[window] == k + 1, int(instances.classes[k]), float(instances.scores[k]),
            cut, off_core,
        ))
    return candidates
