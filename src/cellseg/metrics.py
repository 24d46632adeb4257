"""Metrics for instance segmentation of cells.

Three families:

* **Foreground pixel metrics** (:func:`pixel_counts`, :func:`iou_dice`): counts that callers sum over
  images (and per cell type) before turning them into IoU and Dice, so that a data set's IoU is
  ``sum(intersections) / sum(unions)``, not a mean of per-image ratios.
* **The Sartorius competition metric** (:func:`image_score`, :class:`CompetitionScore`): per image,
  every predicted instance is compared with every true one; at each threshold ``t`` of
  :data:`THRESHOLDS` a prediction matches a true object when their IoU is strictly greater than
  ``t``; matches are one-to-one; the image scores ``TP / (TP + FP + FN)`` averaged over the
  thresholds; a data set scores the mean over its images.
* **COCO AP** through pycocotools (:func:`coco_ap`).

Conventions: a label image is an integer H×W array, 0 = background and every other value one
instance (values need not be consecutive); a mask is a boolean H×W array (any nonzero value counts
as foreground). IoUs are computed sparsely, from the joint histogram of two label images: the cost
grows with the number of pixels and of overlapping pairs, never with ``n_true × n_pred`` full-image
comparisons.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.errors import DataError, ParamsError

#: IoU thresholds of the competition metric: 0.50, 0.55, ..., 0.95.
THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
# The same thresholds in integer percent: ``IoU > t`` is tested exactly as ``100 * inter > pct * union``.
_THRESHOLDS_PCT = np.arange(50, 100, 5, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Foreground pixel metrics


def pixel_counts(pred_fg: np.ndarray, true_fg: np.ndarray) -> tuple[int, int, int]:
    """Return ``(intersection, predicted area, true area)`` in pixels of two foreground masks.

    Nonzero values are foreground, so label images may be passed as they are.
    """
    pred_fg, true_fg = np.asarray(pred_fg), np.asarray(true_fg)
    if pred_fg.shape != true_fg.shape:
        raise DataError(f"foreground masks differ in shape: predicted {pred_fg.shape}, true {true_fg.shape}")
    pred_b, true_b = pred_fg != 0, true_fg != 0
    return int(np.count_nonzero(pred_b & true_b)), int(np.count_nonzero(pred_b)), int(np.count_nonzero(true_b))


def iou_dice(inter: int, pred: int, true: int) -> tuple[float, float]:
    """Return ``(IoU, Dice)`` from pixel counts (possibly summed over many images).

    ``IoU = inter / (pred + true - inter)`` and ``Dice = 2 inter / (pred + true)``. When both areas
    are 0 (empty prediction of an empty truth) both are defined as 1.0: nothing to find, nothing found.
    """
    if min(inter, pred, true) < 0 or inter > min(pred, true):
        raise DataError(f"inconsistent pixel counts: intersection {inter}, predicted {pred}, true {true}")
    if pred + true == 0:
        return 1.0, 1.0
    return inter / (pred + true - inter), 2 * inter / (pred + true)


# ---------------------------------------------------------------------------------------------------
# Sparse IoU of two instance sets


@dataclass(frozen=True)
class SparseIoU:
    """IoUs of two instance sets in triplet form: one entry per (true, predicted) pair sharing pixels.

    ``true_ids``/``pred_ids`` name the instances (label values); ``rows``/``cols`` index into them.
    ``inter`` and ``union`` are exact pixel counts (int64), so threshold tests need no floating point.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    inter: np.ndarray
    union: np.ndarray

    @property
    def ious(self) -> np.ndarray:
        """IoU of each stored pair (float64)."""
        return self.inter / self.union


def _check_label_image(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"{name} label image must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name} label image must have an integer dtype, got {labels.dtype}")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise DataError(f"{name} label image has negative labels (minimum {labels.min()})")
    return labels


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a flat label array to 0 (background), 1..n: return ``(ids, compact labels, areas)``.

    ``ids`` are the n distinct nonzero labels, ascending, and ``areas`` their pixel counts.
    """
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size:  # a lookup table no bigger than a few images: bincount is the fastest way
        flat = flat.astype(np.intp, copy=False)
        counts = np.bincount(flat, minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(len(counts), dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, lut[flat], counts[ids]
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if values[0] != 0:  # no background pixel: shift so that compact labels start at 1
        return values, inverse.astype(np.int64) + 1, counts
    return values[1:], inverse.astype(np.int64), counts[1:]


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> SparseIoU:
    """Sparse IoU of every true instance with every predicted one, for two label images.

    Intersections are the joint histogram of the two (compacted) label images over the pixels where
    both are foreground; areas are their histograms. Instances are the labels present in the image.
    """
    true_labels = _check_label_image(true_labels, "true")
    pred_labels = _check_label_image(pred_labels, "predicted")
    if true_labels.shape != pred_labels.shape:
        raise DataError(f"label images differ in shape: true {true_labels.shape}, predicted {pred_labels.shape}")
    true_ids, t, true_area = _compact(true_labels.ravel())
    pred_ids, p, pred_area = _compact(pred_labels.ravel())
    both = (t > 0) & (p > 0)
    joint = sp.coo_array(
        (np.ones(int(np.count_nonzero(both)), dtype=np.int64), (t[both] - 1, p[both] - 1)),
        shape=(len(true_ids), len(pred_ids)),
    ).tocsr()  # duplicate (true, pred) entries are summed: the joint histogram
    return _from_intersections(true_ids, pred_ids, joint.tocoo(), true_area, pred_area)


def _from_intersections(
    true_ids: np.ndarray, pred_ids: np.ndarray, joint: sp.coo_array, true_area: np.ndarray, pred_area: np.ndarray
) -> SparseIoU:
    rows, cols = joint.coords[0].astype(np.int64), joint.coords[1].astype(np.int64)
    inter = joint.data.astype(np.int64)
    union = true_area[rows].astype(np.int64) + pred_area[cols] - inter
    return SparseIoU(true_ids, pred_ids, rows, cols, inter, union)


# ---------------------------------------------------------------------------------------------------
# Competition metric


@dataclass(frozen=True)
class ImageScore:
    """Competition score of one image: TP, FP and FN at each threshold of :data:`THRESHOLDS`."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @property
    def scores_per_threshold(self) -> np.ndarray:
        """``TP / (TP + FP + FN)`` per threshold; 1.0 where the image has no truth and no prediction."""
        total = self.tp + self.fp + self.fn
        return np.where(total == 0, 1.0, self.tp / np.maximum(total, 1))

    @property
    def score(self) -> float:
        """The image's score: the mean of :attr:`scores_per_threshold`."""
        return float(self.scores_per_threshold.mean())


def score_ious(ious: SparseIoU) -> ImageScore:
    """Score an image from its sparse IoUs.

    Matching is one-to-one and greedy by decreasing IoU (ties broken by true id, then predicted id)
    over the pairs with IoU > 0.5. For label images this is no choice at all: within one set masks do
    not overlap, so an IoU above 0.5 pairs each object with at most one other. For overlapping mask
    lists it resolves competing pairs. Since pairs are taken in decreasing IoU order, the matching at
    any higher threshold ``t`` is this matching restricted to IoU > ``t``.
    """
    cand = np.flatnonzero(2 * ious.inter > ious.union)
    order = cand[np.lexsort((ious.cols[cand], ious.rows[cand], -ious.ious[cand]))]
    used_true, used_pred, matched = set(), set(), []
    for k, r, c in zip(order.tolist(), ious.rows[order].tolist(), ious.cols[order].tolist()):
        if r not in used_true and c not in used_pred:
            used_true.add(r)
            used_pred.add(c)
            matched.append(k)
    inter, union = ious.inter[matched], ious.union[matched]
    tp = (100 * inter[None, :] > _THRESHOLDS_PCT[:, None] * union[None, :]).sum(axis=1)
    return ImageScore(tp=tp, fp=len(ious.pred_ids) - tp, fn=len(ious.true_ids) - tp)


def image_score(true_labels: np.ndarray, pred_labels: np.ndarray) -> ImageScore:
    """Competition score of a predicted label image against the true one.

    Edge cases: no truths and no predictions score 1.0; truths without predictions, or predictions
    without truths, score 0.0.
    """
    return score_ious(iou_matrix(true_labels, pred_labels))


class CompetitionScore:
    """Accumulates image scores into the data set's competition score, overall and per group."""

    def __init__(self) -> None:
        self._per_image: list[np.ndarray] = []  # scores_per_threshold of each image
        self._groups: list[str | None] = []

    def add(self, true_labels: np.ndarray, pred_labels: np.ndarray, group: str | None = None) -> ImageScore:
        """Score one pair of label images, record it under ``group`` (e.g. the cell type) and return it."""
        score = image_score(true_labels, pred_labels)
        self._per_image.append(score.scores_per_threshold)
        self._groups.append(group)
        return score

    def _rows(self, group: str | None) -> np.ndarray:
        rows = [s for s, g in zip(self._per_image, self._groups) if group is None or g == group]
        if not rows:
            raise DataError("no image was added" + ("" if group is None else f" for group {group!r}"))
        return np.stack(rows)

    def per_threshold(self, group: str | None = None) -> dict[float, float]:
        """Mean score at each threshold over all images (or those of ``group``), for a score-vs-t plot."""
        return dict(zip(THRESHOLDS, self._rows(group).mean(axis=0).tolist()))

    def result(self) -> dict[str, float]:
        """``{"score", "n_images"}`` overall plus ``"score/<group>"`` and ``"n_images/<group>"`` per group.

        A score is the mean of image scores; images added without a group count only overall.
        """
        out = {"score": float(self._rows(None).mean()), "n_images": float(len(self._per_image))}
        for group in sorted({g for g in self._groups if g is not None}):
            rows = self._rows(group)
            out[f"score/{group}"] = float(rows.mean())
            out[f"n_images/{group}"] = float(len(rows))
        return out


# ---------------------------------------------------------------------------------------------------
# COCO AP

MAX_DETS = 2000  # detections per image COCO AP counts, as LIVECell's evaluator (SH-SY5Y images hold ~800 cells)
# (key, AP (True) or AR, IoU threshold or None for .50:.95, area range, maxDets index into [1, 100, max_dets])
_COCO_SUMMARY = (
    ("AP", True, None, "all", 2),
    ("AP@100", True, None, "all", 1),
    ("AP50", True, 0.5, "all", 2),
    ("AP75", True, 0.75, "all", 2),
    ("AP_small", True, None, "small", 2),
    ("AP_medium", True, None, "medium", 2),
    ("AP_large", True, None, "large", 2),
    ("AR@1", False, None, "all", 0),
    ("AR@100", False, None, "all", 1),
    ("AR", False, None, "all", 2),
    ("AR_small", False, None, "small", 2),
    ("AR_medium", False, None, "medium", 2),
    ("AR_large", False, None, "large", 2),
)


def _complete_gt(gt: dict[str, Any], class_agnostic: bool) -> dict[str, Any]:
    """A copy of ``gt`` with ``iscrowd``/``area``/``bbox`` filled in where missing (the caller's is untouched).

    ``area`` and ``bbox`` are derived from a compressed-RLE ``segmentation``.
    """
    missing = {"images", "annotations", "categories"} - gt.keys()
    if missing:
        raise DataError(f"COCO ground truth lacks {sorted(missing)}")
    out = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    if class_agnostic:
        out["categories"] = [{"id": 1, "name": "cell"}]
    for i, ann in enumerate(out["annotations"]):
        if class_agnostic:
            ann["category_id"] = 1
        ann.setdefault("iscrowd", 0)
        if "area" in ann and "bbox" in ann:
            continue
        rle = ann.get("segmentation")
        if not (isinstance(rle, dict) and isinstance(rle.get("counts"), (str, bytes))):
            raise DataError(f"COCO annotation {i} lacks 'area' or 'bbox' and has no compressed RLE to derive them from")
        ann.setdefault("area", float(mask_utils.area(rle)))
        ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
    return out


def coco_ap(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    iou_type: str = "segm",
    max_dets: int = MAX_DETS,
    class_agnostic: bool = False,
) -> dict[str, float]:
    """COCO AP/AR of ``results`` (COCO result dicts) against ``gt`` (a COCO instances dict), in memory.

    ``params.maxDets`` is ``[1, 100, max_dets]`` so that images with ~1000 cells count in full. Keys:
    ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``AP_small``/``AP_medium``/``AP_large`` and ``AR``,
    ``AR_small``/``AR_medium``/``AR_large``, all at ``max_dets`` detections per image, plus ``AP@100``
    (COCO's default limit, as papers report it), ``AR@1`` and ``AR@100``. The values are computed from ``COCOeval.eval`` rather than ``summarize()``, whose
    first entry (AP) ignores ``maxDets`` and always uses 100. A value that COCO leaves undefined (no
    ground truth in that area range) is NaN. Empty ``results`` score 0 wherever ground truth exists.
    ``class_agnostic`` puts every annotation and result in one category (for a model without classes).
    """
    if iou_type not in ("segm", "bbox"):
        raise ParamsError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if max_dets < 100:
        raise ParamsError(f"max_dets must be at least 100, got {max_dets}")
    gt = _complete_gt(gt, class_agnostic)
    image_ids = {img["id"] for img in gt["images"]}
    unknown = {r["image_id"] for r in results} - image_ids
    if unknown:
        raise DataError(f"COCO results name images absent from the ground truth: {sorted(unknown)[:5]}")
    results = [{**r, "category_id": 1} if class_agnostic else dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes fails on an empty list: build an empty result set by hand
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.maxDets = [1, 100, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    params, ev = evaluator.params, evaluator.eval
    out = {}
    for key, is_ap, iou, area, m in _COCO_SUMMARY:
        a = params.areaRngLbl.index(area)
        values = ev["precision"][:, :, :, a, m] if is_ap else ev["recall"][:, :, a, m]
        if iou is not None:
            values = values[np.isclose(params.iouThrs, iou)]
        valid = values[values > -1]
        out[key] = float(valid.mean()) if valid.size else float("nan")
    return out
