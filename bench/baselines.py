"""Straightforward reference implementations that the library is measured against."""

from __future__ import annotations

import numpy as np

_THRESHOLDS_PCT = np.arange(50, 100, 5)  # the competition's IoU thresholds 0.50 … 0.95, in percent


def loop_decode(annotation: str, shape: tuple[int, int]) -> np.ndarray:
    """Competition RLE → boolean mask, one slice assignment per run in a Python loop."""
    values = list(map(int, annotation.split()))
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    for start, length in zip(values[0::2], values[1::2]):
        mask[start - 1 : start - 1 + length] = True
    return mask.reshape(shape)


def loop_encode(mask: np.ndarray) -> str:
    """Boolean mask → competition RLE, grouping the foreground pixels into runs in a Python loop."""
    runs: list[int] = []
    for pixel in np.flatnonzero(mask).tolist():
        if runs and pixel == runs[-2] + runs[-1] - 1:  # continues the current run (starts are 1-based)
            runs[-1] += 1
        else:
            runs += [pixel + 1, 1]
    return " ".join(map(str, runs))


def dense_image_score(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Competition score of one image from n×m comparisons of full boolean masks.

    A prediction matches a truth at threshold t when IoU > t; in label images (no overlaps) a truth has at
    most one prediction with IoU > 0.5, so the count of such pairs is the number of true positives.
    """
    true_masks = [true_labels == k for k in np.unique(true_labels) if k]
    pred_masks = [pred_labels == k for k in np.unique(pred_labels) if k]
    if not true_masks and not pred_masks:
        return 1.0
    true_area = np.array([np.count_nonzero(m) for m in true_masks], dtype=np.int64)
    pred_area = np.array([np.count_nonzero(m) for m in pred_masks], dtype=np.int64)
    inter = np.zeros((len(true_masks), len(pred_masks)), dtype=np.int64)
    for i, true in enumerate(true_masks):
        for j, pred in enumerate(pred_masks):
            inter[i, j] = np.count_nonzero(true & pred)
    union = true_area[:, None] + pred_area[None, :] - inter
    tp = np.array([np.count_nonzero(100 * inter > pct * union) for pct in _THRESHOLDS_PCT])
    return float(np.mean(tp / (len(true_masks) + len(pred_masks) - tp)))
