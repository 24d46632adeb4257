"""Mask R-CNN's test-time augmentation: the detections of an image and of its three flips (left-right, up-down,
both), each flipped back, then merged: boxes by weighted boxes fusion (the ``ensemble-boxes`` package, per
class, IoU above :data:`FUSION_IOU`, the fused score the views' mean), each fused cell's soft mask the mean of
the soft masks of the views' detections that match its box (same class, IoU above :data:`FUSION_IOU`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.ops import box_iou

from cellseg.models.detections import Detections

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, up-down)
FUSION_IOU = 0.55  # ensemble-boxes' default


def flipped(image: np.ndarray, left_right: bool, up_down: bool) -> np.ndarray:
    """The H×W ``image`` flipped (each flip is its own inverse)."""
    return np.ascontiguousarray(image[:: -1 if up_down else 1, :: -1 if left_right else 1])


def flip_back(found: Detections, left_right: bool, up_down: bool) -> Detections:
    """The detections of a flipped image, in the frame of the image before the flip."""
    height, width = found.shape
    boxes, windows = found.boxes.copy(), found.windows.copy()
    if left_right:
        boxes[:, [0, 2]] = width - found.boxes[:, [2, 0]]
        windows[:, [0, 2]] = width - found.windows[:, [2, 0]]
    if up_down:
        boxes[:, [1, 3]] = height - found.boxes[:, [3, 1]]
        windows[:, [1, 3]] = height - found.windows[:, [3, 1]]
    masks = [flipped(mask, left_right, up_down) for mask in found.masks]
    return Detections(found.shape, found.classes, found.scores, boxes, windows, masks)


def merge(views: list[Detections]) -> Detections:
    """One image's detections from each view (in its frame), fused as the module docstring says, by
    decreasing score."""
    from ensemble_boxes import weighted_boxes_fusion  # imports numba (≈ 1 s): only where test-time augmentation runs

    shape = views[0].shape
    scale = np.array([shape[1], shape[0], shape[1], shape[0]], dtype=np.float64)
    boxes, scores, classes = weighted_boxes_fusion(
        [np.clip(v.boxes / scale, 0.0, 1.0) for v in views], [v.scores for v in views], [v.classes for v in views],
        iou_thr=FUSION_IOU, conf_type="avg",
    )
    boxes, classes = boxes * scale, classes.astype(np.int64)
    sums = [None] * len(boxes)  # per fused box: (window, summed soft mask, members)
    for view in views:
        if not len(view.scores) or not len(boxes):
            continue
        iou = box_iou(torch.from_numpy(view.boxes).double(), torch.from_numpy(boxes).double()).numpy()
        iou[view.classes[:, None] != classes[None, :]] = 0.0
        best = iou.argmax(axis=1)
        for k in np.flatnonzero(iou[np.arange(len(best)), best] > FUSION_IOU):
            sums[best[k]] = _add(sums[best[k]], view.windows[k], view.masks[k])
    kept = [j for j, total in enumerate(sums) if total is not None]
    windows = np.array([sums[j][0] for j in kept], dtype=np.int64).reshape(-1, 4)
    masks = [np.rint(sums[j][1] / sums[j][2]).astype(np.uint8) for j in kept]
    order = np.argsort(-scores[kept], kind="stable")
    return Detections(
        shape, classes[kept][order], scores[kept][order].astype(np.float32), boxes[kept][order],
        windows[order], [masks[k] for k in order],
    )


def _add(total: tuple | None, window: np.ndarray, mask: np.ndarray) -> tuple:
    """``total`` (a window, the soft masks summed over it, their count) with one more soft mask in ``window``."""
    if total is None:
        return window.copy(), mask.astype(np.float32), 1
    (x0, y0, x1, y1), summed, count = total
    union = np.array([min(x0, window[0]), min(y0, window[1]), max(x1, window[2]), max(y1, window[3])])
    grown = np.zeros((union[3] - union[1], union[2] - union[0]), dtype=np.float32)
    grown[y0 - union[1] : y1 - union[1], x0 - union[0] : x1 - union[0]] = summed
    grown[window[1] - union[1] : window[3] - union[1], window[0] - union[0] : window[2] - union[0]] += mask
    return union, grown, count + 1


def tta_detections(detect: Callable[[np.ndarray], Detections], image: np.ndarray) -> Detections:
    """``detect``'s detections of ``image`` under test-time augmentation (4× its time)."""
    return merge([flip_back(detect(flipped(image, *flip)), *flip) for flip in FLIPS])
