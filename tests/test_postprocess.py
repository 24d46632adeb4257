"""Post-processing: U-Net watershed instances and Mask R-CNN overlap removal."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from cellseg import config
from cellseg.errors import ParamsError
from cellseg.models.unet_targets import BoundaryTarget
from cellseg.postprocess import remove_overlaps, watershed_instances
from helpers.project import project_params

SHAPE = (64, 96)


def disc(centre: tuple[int, int], radius: float, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def probs_from_labels(labels: np.ndarray) -> np.ndarray:
    """Confident (3, H, W) probabilities: boundary on each instance's inner border, interior inside."""
    boundary = find_boundaries(labels, mode="inner") & (labels > 0)
    onehot = np.stack([labels == 0, (labels > 0) & ~boundary, boundary]).astype(np.float32)
    return 0.9 * onehot + 0.1 / 3


def two_touching_discs() -> np.ndarray:
    """Discs of radius 15 whose centres are 28 px apart: they share a border."""
    left, right = disc((32, 30), 15), disc((32, 58), 15)
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[left] = 1
    labels[right & ~left] = 2
    return labels


def watershed(probs: np.ndarray, min_size: int = 0) -> np.ndarray:
    """:func:`watershed_instances` with params.yaml's ``postprocess.unet`` thresholds."""
    post = project_params("postprocess.unet")
    return watershed_instances(
        probs, marker_threshold=post.marker_threshold["default"], mask_threshold=post.mask_threshold["default"],
        min_size=min_size,
    )


def test_two_touching_discs_give_two_instances() -> None:
    truth = two_touching_discs()
    labels = watershed(probs_from_labels(truth))
    assert labels.dtype == np.uint16 and labels.shape == SHAPE
    assert set(np.unique(labels)) == {0, 1, 2}
    for k in (1, 2):
        inst = labels == k
        assert 0.9 < inst.sum() / (np.pi * 15**2) < 1.1
        overlap = np.bincount(truth[inst], minlength=3)
        assert overlap.max() > 0.95 * inst.sum()  # each instance lies in one disc


def small_and_large_blob() -> np.ndarray:
    """Probabilities of a ~314 px disc and a ~50 px one."""
    truth = np.zeros(SHAPE, dtype=np.int32)
    truth[disc((20, 20), 10)] = 1
    truth[disc((45, 70), 4)] = 2
    return probs_from_labels(truth)


def test_min_size_drops_small_blob() -> None:
    probs = small_and_large_blob()
    assert watershed(probs, min_size=30).max() == 2
    kept = watershed(probs, min_size=60)
    assert kept.max() == 1 and kept[20, 20] == 1 and kept[45, 70] == 0
    assert watershed(probs, min_size=400).max() == 0


def test_min_size_per_cell_type_with_default() -> None:
    """The U-Net's instances take the min_size of the (predicted) cell type, else the ``default`` one."""
    probs = small_and_large_blob()
    post = project_params("postprocess.unet", min_size={"shsy5y": 30, "astro": 150, "default": 400})
    target = BoundaryTarget(project_params("unet"))
    assert target.instances(probs, post, "shsy5y").max() == 2
    kept = target.instances(probs, post, "astro")
    assert kept.max() == 1 and kept[20, 20] == 1 and kept[45, 70] == 0
    assert target.instances(probs, post, "cort").max() == 0  # not named: the default


@pytest.mark.parametrize(
    ("min_size", "message"),
    [
        ({"astro": 5}, "no entry for shsy5y, cort and no 'default'"),
        ({"astro": 5, "hela": 5, "default": 5}, "unknown cell type 'hela'"),
    ],
)
def test_min_size_must_cover_every_cell_type(min_size: dict[str, int], message: str) -> None:
    """The params validation, not the watershed, refuses a per-type min_size that misses a cell type."""
    post = {name: project_params(f"postprocess.{name}").model_dump() for name in ("unet", "maskrcnn")}
    post["unet"]["min_size"] = min_size
    with pytest.raises(ParamsError, match=rf"postprocess\.unet\.min_size: .*{message}"):
        config.section({"postprocess": post}, "postprocess")


def test_empty_probabilities_give_no_instances() -> None:
    probs = np.zeros((3, *SHAPE), dtype=np.float32)
    probs[0] = 1
    labels = watershed(probs)
    assert labels.dtype == np.uint16 and not labels.any()


def squares() -> np.ndarray:
    """Three masks: 0 and 1 overlap on a 5x10 strip; 2 lies almost inside 1."""
    masks = np.zeros((3, 30, 30), dtype=bool)
    masks[0, 0:10, 0:10] = True
    masks[1, 5:15, 0:10] = True
    masks[2, 8:15, 2:4] = True
    masks[2, 20, 20] = True  # 2 keeps one pixel of its own after losing the rest to 1
    return masks


def test_remove_overlaps_gives_overlap_to_higher_score() -> None:
    masks = squares()
    labels, kept = remove_overlaps(masks, np.array([0.5, 0.9, 0.3]), min_size=3)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(kept, [0, 1])
    assert (labels[5:10, 0:10] == 2).all()  # the overlap goes to mask 1 (score 0.9), label 2
    assert (labels == 1).sum() == 50 and (labels == 2).sum() == 100
    assert labels[20, 20] == 0  # mask 2 left with one pixel: dropped


def test_remove_overlaps_labels_follow_kept_indices() -> None:
    masks = squares()
    labels, kept = remove_overlaps(masks, np.array([0.9, 0.5, 0.3]))
    np.testing.assert_array_equal(kept, [0, 1, 2])
    for label, index in enumerate(kept, start=1):
        assert (labels == label).sum() > 0
        assert not (labels == label)[~masks[index]].any()  # every pixel of label k+1 is in mask kept[k]
    assert (labels[5:10, 0:10] == 1).all()  # now mask 0 wins the overlap
    assert ((labels > 0) == masks.any(axis=0)).all()  # nothing is dropped at min_size 0


def test_remove_overlaps_drops_fully_covered_mask() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:7, 1:7] = True
    masks[1, 2:4, 2:4] = True
    labels, kept = remove_overlaps(masks, np.array([0.8, 0.2]))
    np.testing.assert_array_equal(kept, [0])
    assert labels.max() == 1 and (labels == 1).sum() == 36


def test_remove_overlaps_no_masks() -> None:
    labels, kept = remove_overlaps(np.zeros((0, 5, 6), dtype=bool), np.zeros(0))
    assert labels.shape == (5, 6) and labels.dtype == np.uint16 and not labels.any() and kept.size == 0


def test_remove_overlaps_on_windows_equals_full_masks() -> None:
    """Crops and their windows give exactly what the full masks give, ties (equal scores) included."""
    rng = np.random.default_rng(4)
    shape, n = (40, 50), 30
    windows = np.empty((n, 4), dtype=np.int64)
    masks = np.zeros((n, *shape), dtype=bool)
    for k in range(n):
        x0, y0 = rng.integers(0, 40), rng.integers(0, 30)
        x1, y1 = x0 + rng.integers(1, 11), y0 + rng.integers(1, 11)
        windows[k] = x0, y0, x1, y1
        masks[k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
    scores = rng.choice([0.2, 0.5, 0.7, 0.9], size=n)
    crops = [masks[k, y0:y1, x0:x1] for k, (x0, y0, x1, y1) in enumerate(windows)]
    for min_size in (0, 5):
        full = remove_overlaps(masks, scores, min_size)
        windowed = remove_overlaps(crops, scores, min_size, windows=windows, shape=shape)
        np.testing.assert_array_equal(full[0], windowed[0])
        np.testing.assert_array_equal(full[1], windowed[1])
    with pytest.raises(ValueError, match="need 30 scores and windows and an image shape"):
        remove_overlaps(crops, scores, windows=windows)
