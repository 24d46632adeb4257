"""From model outputs to one instance label image: the U-Net's watershed or flow dynamics, and Mask R-CNN's
overlap removal.

Label images are uint16, 0 = background, instances labelled 1..n.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed

from cellseg.flows import flow_errors, masks_from_flows
from cellseg.instances import MAX_LABEL


INTERIOR, BOUNDARY = 1, 2  # U-Net classes: 0 background, 1 cell interior, 2 cell boundary
Memo = dict[tuple, Any]  # one image's intermediate results, by the step and the values they depend on


def _memoized(memo: Memo | None, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, or what it gave for ``key`` before, when a ``memo`` is kept."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def watershed_instances(
    probs: np.ndarray, *, marker_threshold: float, mask_threshold: float, min_size: int, memo: Memo | None = None
) -> np.ndarray:
    """Instances from (3, H, W) background/interior/boundary probabilities by marker-controlled watershed.

    Markers: connected components of ``interior > marker_threshold``; they flood ``1 - interior`` within
    ``interior + boundary > mask_threshold``; instances smaller than ``min_size`` pixels are dropped. A ``memo``
    (one per image) keeps the watershed of each pair of thresholds, for a search that comes back to them.
    """

    def flood() -> np.ndarray:
        interior = probs[INTERIOR]
        markers, _ = ndi.label(interior > marker_threshold)
        return watershed(1.0 - interior, markers, mask=interior + probs[BOUNDARY] > mask_threshold)

    return _drop_small(_memoized(memo, ("watershed", marker_threshold, mask_threshold), flood), min_size)


def flow_instances(
    flows: np.ndarray, cellprob: np.ndarray, *, cellprob_threshold: float, flow_threshold: float, min_size: int,
    memo: Memo | None = None,
) -> np.ndarray:
    """Instances from network-scale flows (2, H, W) and cell-probability logits (H, W) by cellpose's dynamics
    (:func:`~cellseg.flows.masks_from_flows`), as cellpose's ``compute_masks`` makes them: with
    ``flow_threshold`` > 0, instances whose :func:`~cellseg.flows.flow_errors` exceed it are dropped; then
    those smaller than ``min_size`` pixels. A ``memo`` (one per image) keeps the dynamics and the flow errors
    of each ``cellprob_threshold``, for a search that comes back to it."""
    masks = _memoized(
        memo, ("dynamics", cellprob_threshold),
        lambda: masks_from_flows(flows, cellprob, cellprob_threshold=cellprob_threshold),
    )
    if flow_threshold > 0:
        errors = _memoized(memo, ("flow_errors", cellprob_threshold), lambda: flow_errors(masks, flows))
        bad = np.concatenate([[False], errors > flow_threshold])  # bad[label]
        masks = np.where(bad[masks], 0, masks)
    return _drop_small(masks, min_size)


def remove_overlaps(
    masks: np.ndarray | Sequence[np.ndarray],
    scores: np.ndarray,
    min_size: int = 0,
    *,
    windows: np.ndarray | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label image from N boolean masks: a shared pixel goes to the highest-score mask.

    ``masks`` is (N, H, W); or, given ``windows`` (N×4 integer ``x0, y0, x1, y1``) and the image ``shape``,
    N crops, crop ``k`` covering ``windows[k]`` (the mask is empty elsewhere): only the windows are read,
    so the cost follows the cells' area, not N × H × W. Instances left with fewer than ``max(min_size, 1)``
    pixels are dropped (their pixels become background). Returns ``(labels, kept)``: label ``k + 1`` is mask
    ``kept[k]`` (``kept`` ascending).
    """
    scores = np.asarray(scores)
    if windows is None:
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
        shape = masks.shape[1:]
        windows = np.tile([0, 0, shape[1], shape[0]], (len(masks), 1))
    if shape is None or scores.shape != (len(masks),) or windows.shape != (len(masks), 4):
        raise ValueError(f"{len(masks)} masks need {len(masks)} scores and windows and an image shape")
    if len(masks) > MAX_LABEL:
        raise ValueError(f"{len(masks)} masks do not fit a uint16 label image")
    owner = np.full(shape, -1, dtype=np.int64)
    for k in np.argsort(-scores, kind="stable")[::-1]:  # the best mask is painted last and keeps its pixels
        x0, y0, x1, y1 = windows[k]
        owner[y0:y1, x0:x1][np.asarray(masks[k], dtype=bool)] = k
    covered = owner >= 0
    sizes = np.bincount(owner[covered], minlength=len(masks))
    kept = np.flatnonzero(sizes >= max(min_size, 1))
    lut = np.zeros(len(masks) + 1, dtype=np.uint16)  # lut[i + 1]: the label of mask i (0 = dropped)
    lut[kept + 1] = np.arange(1, len(kept) + 1)
    return lut[owner + 1], kept


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove instances of fewer than ``min_size`` pixels and relabel 1..n as uint16."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    labels, _, _ = relabel_sequential(labels)
    if labels.max(initial=0) > MAX_LABEL:
        raise ValueError(f"{labels.max()} instances do not fit a uint16 label image")
    return labels.astype(np.uint16)
