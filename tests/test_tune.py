"""The tune stage's search (:mod:`cellseg.tune`) and its file, which ``evaluate`` and ``cellseg predict`` read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellseg.config import UNetPostprocess
from cellseg.errors import DataError
from cellseg.instances import Instances
from cellseg.tune import loosest, read_tuned, read_tuning, tune, tuned_summary, tuning_metrics, write_tuning
from helpers.project import project_params

SIZE = 64
# Per cell type: the side of its true (square) cells and of the debris its predictions add.
CELLS = {"shsy5y": (6, 2), "astro": (16, 9), "cort": (8, 3)}


def _image(cell_type: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth (4 square cells) and a prediction of the same cells plus 4 square specks of debris."""
    cell, speck = CELLS[cell_type]
    truth, predicted = np.zeros((SIZE, SIZE), np.uint16), np.zeros((SIZE, SIZE), np.uint16)
    rng = np.random.default_rng(seed)
    for k in range(4):
        y, x = 2 + 30 * (k // 2), 2 + 30 * (k % 2) + int(rng.integers(0, 4))
        truth[y : y + cell, x : x + cell] = predicted[y : y + cell, x : x + cell] = k + 1
        y, x = y + cell + 2, x
        predicted[y : y + speck, x : x + speck] = k + 5
    return truth, predicted


class Store:
    """What the search reads of an image store."""

    def __init__(self, images: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> None:
        self.held = images

    def image(self, image_id: str) -> str:
        return image_id  # the fake predictor's outputs are looked up by id

    def labels(self, image_id: str) -> np.ndarray:
        return self.held[image_id][1]

    def cell_type(self, image_id: str) -> str:
        return self.held[image_id][0]


class Debris:
    """A predictor whose predictions are known label images: ``min_size`` of the image's type drops debris."""

    name = "unet"
    post_fields = ("min_size",)

    def __init__(self, store: Store, post: UNetPostprocess) -> None:
        self.store, self.post = store, post
        self.calls = 0

    def outputs(self, image_id: str) -> str:
        return image_id

    def cell_types(self, image_id: str) -> set[str]:
        return {self.store.cell_type(image_id)}

    def instances(self, image_id: str, post: UNetPostprocess) -> Instances:
        self.calls += 1
        cell_type, _, predicted = self.store.held[image_id]
        sizes = np.bincount(predicted.ravel())
        small = (sizes < post.min_size.get(cell_type, post.min_size.get("default", 0))) & (np.arange(len(sizes)) > 0)
        labels = np.where(small[predicted], 0, predicted).astype(np.uint16)
        n = len(np.unique(labels)) - 1
        return Instances(labels, np.ones(n, np.int64), np.ones(n, np.float32))


def _world(n_per_type: int = 6) -> tuple[Store, pd.DataFrame]:
    held, rows = {}, []
    for cell_type in CELLS:
        for k in range(n_per_type):
            image_id = f"{cell_type}{k}"
            held[image_id] = (cell_type, *_image(cell_type, k))
            rows.append({"image_id": image_id, "sample_id": f"{cell_type}-{k // 2}", "cell_type": cell_type})
    return Store(held), pd.DataFrame(rows)


GRID = {"min_size": [0, 10, 50, 100, 200, 300]}


def test_the_search_finds_each_cell_types_own_value_and_reports_the_gain() -> None:
    """Debris of 4, 81 and 9 px against cells of 36, 256 and 64 px: the values that drop the debris alone are found
    per type (the first of equal candidates, from the start, is kept), and scores go from < 1 to 1."""
    store, images = _world()
    start = project_params("postprocess.unet", min_size={"default": 0})
    tuning = tune(Debris(store, loosest(start, GRID)), store, images, start, GRID, rounds=2, folds=3, seed=0)
    assert tuning.post.min_size == {"shsy5y": 10, "astro": 100, "cort": 10}
    assert tuning.scores["tuned"] == {"all": 1.0, "shsy5y": 1.0, "astro": 1.0, "cort": 1.0}
    assert tuning.scores["cross_validated"]["all"] == 1.0  # every fold finds values that drop the debris alone
    assert all(score < 1.0 for score in tuning.scores["params"].values())
    metrics = tuning_metrics(tuning)
    assert metrics["gain"] == pytest.approx(1.0 - tuning.scores["params"]["all"]) and metrics["gain/astro"] > 0
    assert len(tuning.folds) == 3 and sorted(i for f in tuning.folds for i in f["images"]) == sorted(images["image_id"])


def test_ties_keep_the_params_value_and_scores_are_computed_once() -> None:
    """Where no candidate beats the value held, it stays (the params' values stand unless beaten), and a
    revisited set of values is not post-processed again."""
    store, images = _world(n_per_type=3)
    start = project_params("postprocess.unet", min_size={"shsy5y": 20, "astro": 150, "cort": 40})  # already right
    predictor = Debris(store, loosest(start, GRID))
    tuning = tune(predictor, store, images, start, GRID, rounds=3, folds=3, seed=0)
    assert tuning.post.min_size == {"shsy5y": 20, "astro": 150, "cort": 40}
    assert tuning.scores["params"] == tuning.scores["tuned"] == tuning.scores["cross_validated"]
    distinct = len(images) * (len(GRID["min_size"]) + 1)  # each image: the start and every candidate
    assert predictor.calls <= distinct


def test_the_loosest_values_are_each_fields_smallest_candidate_for_every_type() -> None:
    """What the tune stage makes its predictor with: Mask R-CNN's score floor then keeps every candidate's detections."""
    post = project_params("postprocess.maskrcnn", score_threshold={"astro": 0.5, "default": 0.3})
    floor = loosest(post, {"score_threshold": [0.2, 0.05, 0.4], "min_size": [30, 10]})
    assert floor.score_threshold == {"default": 0.05} and floor.min_size == {"default": 10}
    assert floor.mask_threshold == post.mask_threshold


def test_fewer_samples_than_folds_make_folds_of_images_and_too_few_images_are_a_clear_error(caplog) -> None:
    store, images = _world(n_per_type=1)  # 3 images, 3 samples
    post = project_params("postprocess.unet")
    one_sample = images.assign(sample_id="well-1")
    tuning = tune(Debris(store, post), store, one_sample, post, GRID, rounds=1, folds=3, seed=0)
    assert sorted(len(f["images"]) for f in tuning.folds) == [1, 1, 1] and "folds are of images" in caplog.text
    with pytest.raises(DataError, match="the 3 validation images are too few for tune.folds 4; lower tune.folds"):
        tune(Debris(store, post), store, images, post, GRID, rounds=1, folds=4, seed=0)


def _state(weight: float = 1.0) -> dict:
    return {"model": "unet", "model_state": {"w": torch.full((2,), weight)}, "epoch": 1}


def test_the_tuned_file_is_read_for_its_own_checkpoint_only(tmp_path: Path) -> None:
    store, images = _world(n_per_type=3)
    post = project_params("postprocess.unet")
    tuning = tune(Debris(store, post), store, images, post, GRID, rounds=1, folds=3, seed=0)
    path = tmp_path / "postprocess.json"
    write_tuning(path, tuning, _state(), tta=False, search={"grid": GRID})
    assert read_tuned(path, _state()) == tuning.post
    record = json.loads(path.read_text())
    assert record["map"]["tuned"]["all"] == tuning.scores["tuned"]["all"] and record["search"] == {"grid": GRID}
    assert f"{tuning.scores['cross_validated']['all']:.3f} cross-validated" in tuned_summary(path)
    with pytest.raises(DataError, match="tuned for another checkpoint .*rerun the tune stage"):
        read_tuned(path, _state(weight=2.0))
    with pytest.raises(DataError, match="tuned for model 'unet', not for this maskrcnn checkpoint"):
        read_tuned(path, {**_state(), "model": "maskrcnn"})
    record["postprocess"]["min_size"] = {"default": -1}
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"postprocess.min_size.default: Input should be greater than or equal to 0"):
        read_tuned(path, _state())
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a readable tuned post-processing file"):
        read_tuned(path, _state())


def test_a_file_tuned_on_the_other_kind_of_outputs_is_used_with_a_warning(tmp_path: Path, caplog) -> None:
    """A file searched on TTA outputs read for a run without TTA (and the other way round) warns, naming the
    file; the same kind, or a caller that does not say, reads it silently."""
    store, images = _world(n_per_type=3)
    post = project_params("postprocess.unet")
    tuning = tune(Debris(store, post), store, images, post, GRID, rounds=1, folds=3, seed=0)
    path = tmp_path / "postprocess.json"
    for tuned_tta in (True, False):
        write_tuning(path, tuning, _state(), tta=tuned_tta, search={"grid": GRID})
        assert read_tuning(path, _state()) == (tuning.post, tuned_tta)  # the values, and the outputs searched
        for run_tta in (None, tuned_tta):
            caplog.clear()
            assert read_tuned(path, _state(), run_tta) == tuning.post and not caplog.records
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cellseg.tune"):
            assert read_tuned(path, _state(), not tuned_tta) == tuning.post
        used = "without TTA" if tuned_tta else "with TTA"
        assert f"{path}: tuned on " in caplog.text and f"outputs, used {used}" in caplog.text
