"""Evaluation, report and plots: exact on a perfect predictor, sensible on a degraded one."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.coco import to_coco
from cellseg.data import ImageStore
from cellseg.decode import decode_dataset
from cellseg.evaluate import evaluate_predictor
from cellseg.inference import coco_results
from cellseg.instances import Instances
from cellseg.report import strengths, write_plots, write_report
from cellseg.celltypes import CELL_TYPES
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize
from helpers.project import project_params


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[ImageStore, list[str], dict]:
    root = tmp_path_factory.mktemp("eval")
    synthesize(root / "raw", 3, seed=5)
    images = decode_dataset(load_source("synthetic", root / "raw"), root / "decoded")
    ids = images["image_id"].tolist()
    import pandas as pd

    coco = to_coco(images, pd.read_parquet(root / "decoded" / "instances.parquet"), ids)
    return ImageStore(root / "raw", root / "decoded", ids), ids, coco


class Oracle:
    """A predictor that returns the truth (optionally with every other cell dropped), confident and typed: each
    image and all its cells get the image's true type, or ``mistype[true type]`` where given."""

    def __init__(
        self,
        store: ImageStore,
        drop_every_other: bool = False,
        name: str = "oracle",
        mistype: Mapping[str, str] | None = None,
    ) -> None:
        self.store, self.drop, self.name, self.mistype = store, drop_every_other, name, dict(mistype or {})
        self._ids = {id(store.image(i)): i for i in store.image_ids}

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        out = []
        for image in images:
            image_id = self._ids[id(image)]  # the oracle knows which image it is given, and so its truth
            labels = self.store.labels(image_id).copy()
            if self.drop:
                labels[labels % 2 == 0] = 0
                labels = ((labels + 1) // 2).astype(np.uint16)
            n = int(labels.max())
            cell_type = self.store.cell_type(image_id)
            category = CELL_TYPES.index(self.mistype.get(cell_type, cell_type)) + 1
            out.append(Instances(labels, np.full(n, category), np.linspace(1, 0.5, n), image_class=category))
        return out


def test_perfect_predictions_score_one(dataset) -> None:
    store, ids, coco = dataset
    result = evaluate_predictor(Oracle(store), store, ids, coco)
    m = result.metrics
    for cell_type in ("shsy5y", "astro", "cort"):
        assert m[f"map/{cell_type}"] == pytest.approx(1.0)
        assert m[f"dice/{cell_type}"] == pytest.approx(1.0)
    assert m["map"] == m["iou"] == m["type_accuracy"] == m["image_type_accuracy"] == pytest.approx(1.0)
    assert all(m[f"image_type_accuracy/{t}"] == 1.0 for t in CELL_TYPES)
    # COCO AP is below 1 only through the cells that the decode overlap rule trimmed
    assert m["coco_segm_AP"] > 0.95 and m["coco_bbox_AP50"] > 0.97
    assert m["n_pred"] == m["n_true"] > 100
    assert m["recall50"] == 1.0 and all(m[f"recall50/{t}"] == 1.0 for t in CELL_TYPES)
    assert m["coco_segm_AP_maxdets100"] <= m["coco_segm_AP"]  # COCO's default limit counts fewer cells
    # every name is one MLflow takes (alphanumerics, _ - . space : /): evaluate logs them all into the runs
    assert [k for k in m if not re.fullmatch(r"[\w\-. :/]+", k)] == []
    assert list(result.per_threshold["all"].values()) == pytest.approx([1.0] * 10)


def test_missing_half_of_the_cells(dataset) -> None:
    store, ids, coco = dataset
    m = evaluate_predictor(Oracle(store, drop_every_other=True), store, ids, coco).metrics
    # TP = n/2, FN = n/2, FP = 0 at every threshold → 0.5 per image (±1 cell for odd counts)
    assert m["map"] == pytest.approx(0.5, abs=0.02)
    assert m["n_pred"] == pytest.approx(m["n_true"] / 2, abs=3)
    assert m["recall50"] == pytest.approx(m["n_pred"] / m["n_true"])  # every cell kept is found, no other
    assert m["coco_segm_AP"] < 0.6


def test_mistyped_images(dataset) -> None:
    """Every astro image and cell named cort: the competition mAP ignores types; the type accuracies, and the
    per-class COCO AP of astro images, do not."""
    store, ids, coco = dataset
    kept = [i for i in ids if store.cell_type(i) in ("astro", "cort")]  # two images: quicker than all three
    keys = set(kept)
    images = [image for image in coco["images"] if image["image_key"] in keys]
    numbers = {image["id"] for image in images}
    coco = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in numbers]}
    m = evaluate_predictor(Oracle(store, mistype={"astro": "cort"}), store, kept, coco).metrics
    assert m["map"] == pytest.approx(1.0)
    assert (m["image_type_accuracy"], m["image_type_accuracy/astro"], m["image_type_accuracy/cort"]) == (0.5, 0.0, 1.0)
    assert "image_type_accuracy/shsy5y" not in m
    cells = {i: int(store.labels(i).max()) for i in kept}
    cort = sum(n for i, n in cells.items() if store.cell_type(i) == "cort")
    assert m["type_accuracy"] == pytest.approx(cort / sum(cells.values()))
    for iou_type in ("segm", "bbox"):
        assert m[f"coco_{iou_type}_AP/astro"] == 0.0 and m[f"coco_{iou_type}_AP/cort"] > 0.95


def test_coco_results_round_trip(dataset) -> None:
    store, ids, _ = dataset
    labels = store.labels(ids[0])
    n = int(labels.max())
    found = Instances(labels, np.full(n, 2), np.ones(n))
    results = coco_results(found, 7)
    assert len(results) == n and {r["category_id"] for r in results} == {2}
    for k in (0, n // 2, n - 1):
        assert np.array_equal(mask_utils.decode(results[k]["segmentation"]).astype(bool), labels == k + 1)


def test_plots_and_report(dataset, tmp_path: Path) -> None:
    store, ids, coco = dataset
    evaluations = [evaluate_predictor(Oracle(store, name=n, drop_every_other=n == "unet"), store, ids, coco) for n in ("unet", "maskrcnn")]
    histories = {"unet": [{"epoch": 1, "val/dice": 0.5}, {"epoch": 2, "val/dice": 0.7}], "maskrcnn": [{"epoch": 1, "val/map": 0.2}]}
    plots = write_plots(evaluations, store, ids, histories, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 for p in plots.values())
    assert len([c for c in plots if c.startswith("Overlay")]) == 6
    assert {"Overlay: U-Net (EfficientNet-B0), astro image", "Overlay: Mask R-CNN, shsy5y image"} <= set(plots)
    report = tmp_path / "reports" / "compare.md"
    changes = {"unet": {"target": "flows"}, "maskrcnn": {"backbone": "resnet34_fpn"}}  # each model says how it works
    params = {name: project_params(name, **change).model_dump() for name, change in changes.items()}
    write_report(report, evaluations, store, ids, plots, params)
    text = report.read_text()
    assert "The U-Net predicts cellpose's flows" in text and "Mask R-CNN (resnet34_fpn) detects each cell" in text
    assert "| cell type |" in text and "| shsy5y |" in text
    assert "Mask R-CNN leads with mAP 1.000" in text
    level = strengths(evaluations[1:] * 2, ["all"])
    assert level == ["- **all**: no model leads: Mask R-CNN and Mask R-CNN both reach mAP 1.000."]
    assert "](../plots/curves.png)" in text and "`efficientnet-b0`" in text
