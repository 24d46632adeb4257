"""A reference competition scorer for lists of possibly overlapping masks, to check the label-image one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from cellseg.metrics import ImageScore, SparseIoU, score_ious


def _incidence(masks: Sequence[np.ndarray] | np.ndarray, n_pixels: int) -> tuple[np.ndarray, sp.csr_array]:
    """``(positions of the non-empty masks, their (n, n_pixels) 0/1 instance × pixel matrix)``."""
    pixels = [np.flatnonzero(m) for m in masks]
    ids = np.array([i for i, p in enumerate(pixels) if p.size], dtype=np.int64)  # an empty mask is no instance
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), [pixels[i].size for i in ids])
    cols = np.concatenate([pixels[i] for i in ids]) if len(ids) else np.zeros(0, dtype=np.int64)
    return ids, sp.csr_array((np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=(len(ids), n_pixels))


def mask_iou_matrix(
    true_masks: Sequence[np.ndarray] | np.ndarray, pred_masks: Sequence[np.ndarray] | np.ndarray
) -> SparseIoU:
    """Sparse IoU of two mask lists: the product of their incidence matrices holds every overlap.

    The ids of the result are positions in the input lists.
    """
    n_pixels = max((np.asarray(m).size for m in (*true_masks[:1], *pred_masks[:1])), default=0)
    true_ids, true_m = _incidence(true_masks, n_pixels)
    pred_ids, pred_m = _incidence(pred_masks, n_pixels)
    joint = sp.coo_array(true_m @ pred_m.T)  # one entry per overlapping pair
    rows, cols = joint.coords[0].astype(np.int64), joint.coords[1].astype(np.int64)
    inter = joint.data.astype(np.int64)
    true_area, pred_area = true_m.sum(axis=1).astype(np.int64), pred_m.sum(axis=1).astype(np.int64)
    return SparseIoU(true_ids, pred_ids, rows, cols, inter, true_area[rows] + pred_area[cols] - inter)


def image_score_masks(
    true_masks: Sequence[np.ndarray] | np.ndarray, pred_masks: Sequence[np.ndarray] | np.ndarray
) -> ImageScore:
    """Competition score of two mask lists (greedy one-to-one matching, as in ``score_ious``)."""
    return score_ious(mask_iou_matrix(true_masks, pred_masks))
