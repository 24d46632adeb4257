"""Evaluation of trained models on the validation images: the competition mAP, COCO AP, pixel IoU/Dice.

Every metric is given overall and per (true) cell type. Models see the images only: the cell types they use
are their own predictions. COCO AP is per class, as COCO defines it, with each model's predicted classes;
``image_type_accuracy`` is the share of images whose cell type the model names (the U-Net: its classification
head; Mask R-CNN: the majority type of its cells), ``type_accuracy`` the share of found cells given the
image's true type, ``recall50`` the share of true cells a prediction matches at IoU > 0.5. COCO AP counts up
to :data:`~cellseg.metrics.MAX_DETS` detections per image, as LIVECell's evaluator does (``AP_maxdets100``: at
100, to compare with papers that keep COCO's default).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cellseg.data import ImageStore
from cellseg.inference import coco_results
from cellseg.instances import Instances, Predictor
from cellseg.celltypes import category_id
from cellseg.metrics import CompetitionScore, coco_ap, iou_dice, pixel_counts

log = logging.getLogger(__name__)

# coco_ap's keys → the metrics' ("@" is not a character MLflow takes in a metric's name)
COCO_KEYS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "AP@100": "AP_maxdets100"}


@dataclass
class ModelEvaluation:
    """One model's metrics (flat ``name[/cell_type]`` keys), score(t) curves and per-image predictions."""

    name: str
    metrics: dict[str, float]
    per_threshold: dict[str, dict[float, float]]
    predictions: dict[str, Instances] = field(repr=False)


def evaluate_predictor(
    predictor: Predictor, store: ImageStore, image_ids: Sequence[str], coco_gt: dict, batch_size: int = 4
) -> ModelEvaluation:
    """Run ``predictor`` on ``image_ids`` (whole images from ``store``) and score it against their labels.

    ``coco_gt`` is the COCO json of these images (its images carry ``image_key``, the string id).
    """
    coco_id = {image["image_key"]: image["id"] for image in coco_gt["images"]}
    score = CompetitionScore()
    pixels: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    results: list[dict] = []
    predictions: dict[str, Instances] = {}
    typed = np.zeros(2, dtype=np.int64)  # instances given the image's own cell type, all instances
    images_typed: dict[str, np.ndarray] = {}  # images whose type the model names, all images
    elapsed = 0.0
    for first in tqdm(range(0, len(image_ids), batch_size), desc=f"evaluate {predictor.name}", unit="batch"):
        ids = list(image_ids[first : first + batch_size])
        began = time.perf_counter()
        found = predictor.predict([store.image(i) for i in ids])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - began
        for image_id, instances in zip(ids, found):
            truth, cell_type = store.labels(image_id), store.cell_type(image_id)  # the truth, for scoring only
            matched = score.add(truth, instances.labels, group=cell_type).tp[0]  # true cells found at IoU > 0.5
            image_pixels = np.array(pixel_counts(instances.labels > 0, truth > 0))  # once per image, for both groups
            image_counts = np.array([_n_instances(truth), len(instances), matched])
            for group in ("all", cell_type):
                pixels[group] = pixels.get(group, 0) + image_pixels
                counts[group] = counts.get(group, 0) + image_counts
                images_typed[group] = images_typed.get(group, 0) + np.array([instances.image_type == cell_type, 1])
            typed += (np.count_nonzero(instances.classes == category_id(cell_type)), len(instances))
            results += coco_results(instances, coco_id[image_id])
            predictions[image_id] = instances
    metrics = _summarize(score, pixels, counts, coco_gt, results)
    metrics["images_per_s"] = len(image_ids) / elapsed if elapsed else float("nan")
    metrics["type_accuracy"] = typed[0] / typed[1] if typed[1] else float("nan")
    for group, (right, total) in sorted(images_typed.items(), key=lambda item: (item[0] != "all", item[0])):
        metrics["image_type_accuracy" + ("" if group == "all" else f"/{group}")] = right / total
    groups = [None, *sorted({store.cell_type(i) for i in image_ids})]
    curves = {group or "all": score.per_threshold(group) for group in groups}
    return ModelEvaluation(predictor.name, metrics, curves, predictions)


def _summarize(
    score: CompetitionScore,
    pixels: dict[str, np.ndarray],
    counts: dict[str, np.ndarray],
    coco_gt: dict,
    results: list[dict],
) -> dict[str, float]:
    competition = score.result()
    metrics: dict[str, float] = {}
    for group in sorted(pixels, key=lambda g: (g != "all", g)):
        suffix = "" if group == "all" else f"/{group}"
        metrics[f"map{suffix}"] = competition[f"score{suffix}"]
        metrics[f"iou{suffix}"], metrics[f"dice{suffix}"] = iou_dice(*map(int, pixels[group]))
        n_true, n_pred, matched = (float(c) for c in counts[group])
        metrics[f"n_true{suffix}"], metrics[f"n_pred{suffix}"] = n_true, n_pred
        metrics[f"recall50{suffix}"] = matched / n_true if n_true else float("nan")
        gt = coco_gt if group == "all" else _coco_subset(coco_gt, group)
        keep = {image["id"] for image in gt["images"]}
        subset = [r for r in results if r["image_id"] in keep]
        for iou_type in ("segm", "bbox"):
            ap = coco_ap(gt, subset, iou_type=iou_type)
            for key, name in COCO_KEYS.items():
                metrics[f"coco_{iou_type}_{name}{suffix}"] = ap[key]
    return metrics


def _coco_subset(coco: dict, cell_type: str) -> dict:
    """The images of one cell type and their annotations."""
    images = [image for image in coco["images"] if image["cell_type"] == cell_type]
    ids = {image["id"] for image in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def _n_instances(labels: np.ndarray) -> int:
    """Instances present in a label image (labels need not be consecutive)."""
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
