"""Post-processing tuned per cell type on the validation images: what the ``tune`` stage searches and writes.

A trained model's network outputs for each validation image are computed once (its predictor's ``outputs``);
the search then only re-runs the post-processing (``instances``), whose costly steps each image's outputs keep
(the watershed, cellpose's dynamics, per threshold). It is a coordinate search: one (value, cell type) at a
time, each candidate of the params' lists is tried, and kept when it raises the summed competition score of
the images it shapes (those whose predicted cell types include it: the U-Net's image type, Mask R-CNN's
detection classes); ties keep the value held, so the params' values stand unless beaten. ``rounds`` passes.

Against overfitting the validation images, the grid is coarse (a few candidates a value, in ``params.yaml``)
and the gain reported is cross-validated: the validation images are split into ``folds`` by sample, as the
split stage does, and each fold is scored with the values searched on the other folds. The values written
are those searched on all the validation images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from cellseg.celltypes import CELL_TYPES, DEFAULT, by_type
from cellseg.checkpoint import content_hash
from cellseg.data import ImageStore
from cellseg.errors import DataError
from cellseg.instances import Instances
from cellseg.io import write_json
from cellseg.metrics import image_score
from cellseg.registry import MODELS
from cellseg.split import assign_folds, sample_groups

log = logging.getLogger(__name__)

RESULTS = ("params", "tuned", "cross_validated")  # the scores a tuning reports
TUNED_FILE = "postprocess.json"  # the tune stage's file, beside the checkpoint it was tuned for


class Tunable(Protocol):
    """A predictor whose inference splits into network outputs and post-processing."""

    name: str
    post_fields: tuple[str, ...]  # the post-processing values it reads

    def outputs(self, image: np.ndarray) -> Any:
        """One uint8 H×W image's network outputs."""

    def cell_types(self, outputs: Any) -> set[str]:
        """The cell types whose post-processing values shape these outputs' instances."""

    def instances(self, outputs: Any, post: Any) -> Instances:
        """The instances of one image's outputs with the post-processing values ``post``."""


@dataclass(frozen=True)
class Tuning:
    """A search's outcome: the values found on all images, the competition mAP (overall and per true cell type)
    with the params' values, the found ones and cross-validated, and each fold's images and values."""

    post: BaseModel
    scores: dict[str, dict[str, float]]
    folds: list[dict]


class _Scores:
    """Each validation image's competition score under a post-processing, computed once per distinct set of the
    values that shape the image."""

    def __init__(self, predictor: Tunable, store: ImageStore, image_ids: Sequence[str]) -> None:
        self.predictor = predictor
        self.outputs = {i: predictor.outputs(store.image(i)) for i in tqdm(image_ids, desc="tune: outputs", unit="img")}
        self.types = {i: sorted(predictor.cell_types(out)) for i, out in self.outputs.items()}
        self.truth = {i: store.labels(i) for i in image_ids}
        self._cache: dict[tuple, float] = {}

    def __call__(self, image_id: str, values: Mapping[str, Mapping[str, Any]], post: BaseModel) -> float:
        key = (image_id, *(values[f][t] for t in self.types[image_id] for f in values))
        if key not in self._cache:
            found = self.predictor.instances(self.outputs[image_id], post)
            self._cache[key] = image_score(self.truth[image_id], found.labels).score
        return self._cache[key]


def _with(start: BaseModel, values: Mapping[str, Mapping[str, Any]]) -> BaseModel:
    return start.model_copy(update={field: dict(per) for field, per in values.items()})


def coordinate_search(
    scores: _Scores, image_ids: Sequence[str], start: BaseModel, grid: Mapping[str, Sequence[Any]], rounds: int
) -> BaseModel:
    """The post-processing the module docstring's search finds on ``image_ids``, from ``start``."""
    values = {field: by_type(getattr(start, field)) for field in grid}

    def total(trial: Mapping[str, Mapping[str, Any]], ids: Sequence[str]) -> float:
        post = _with(start, trial)
        return sum(scores(i, trial, post) for i in ids)

    for _ in range(rounds):
        changed = False
        for field, candidates in grid.items():
            for cell_type in CELL_TYPES:
                shaped = [i for i in image_ids if cell_type in scores.types[i]]
                if not shaped:
                    continue
                held = values[field][cell_type]
                best, best_score = held, total(values, shaped)
                for candidate in candidates:
                    trial = {**values, field: {**values[field], cell_type: candidate}}
                    if (score := total(trial, shaped)) > best_score + 1e-12:
                        best, best_score = candidate, score
                values[field][cell_type] = best
                changed |= best != held
        if not changed:
            break
    return _with(start, values)


def loosest(post: BaseModel, grid: Mapping[str, Sequence[Any]]) -> BaseModel:
    """``post`` with each value of ``grid`` at its smallest candidate for every cell type: a predictor made with it
    gives outputs that hold whatever a candidate can keep (Mask R-CNN's score floor; the U-Net's outputs do not
    depend on it)."""
    return post.model_copy(update={field: {DEFAULT: min(candidates)} for field, candidates in grid.items()})


def tune(
    predictor: Tunable, store: ImageStore, images: pd.DataFrame, start: BaseModel, grid: Mapping[str, Sequence[Any]],
    *, rounds: int, folds: int, seed: int,
) -> Tuning:
    """Search ``predictor``'s post-processing from ``start``, over ``grid``'s candidates for each of its
    ``post_fields``, on the validation ``images`` (``image_id``, ``sample_id``, ``cell_type`` rows), scoring them
    against ``store``'s label images. Make ``predictor`` with :func:`loosest`."""
    if len(images) < folds:
        raise DataError(f"tune: the {len(images)} validation images are too few for tune.folds {folds}; lower tune.folds")
    if (groups := sample_groups(images).nunique()) < folds:
        log.warning(
            "tune: the %d validation images hold %d sample(s), fewer than tune.folds %d: the folds are of images, "
            "not samples (images of one sample fall in several folds: the cross-validated gain is optimistic)",
            len(images), groups, folds,
        )
        images = images.assign(sample_id=images["image_id"])
    grid = {field: list(grid[field]) for field in predictor.post_fields}
    image_ids = list(images["image_id"])
    scores = _Scores(predictor, store, image_ids)
    start_values = {field: by_type(getattr(start, field)) for field in grid}
    fold_of = dict(zip(image_ids, assign_folds(images.reset_index(drop=True), folds, seed)))
    out_of_fold: dict[str, float] = {}
    fold_records = []
    for fold in tqdm(range(folds), desc="tune: folds", unit="fold"):
        held_out = [i for i in image_ids if fold_of[i] == fold]
        found = coordinate_search(scores, [i for i in image_ids if fold_of[i] != fold], start, grid, rounds)
        found_values = {field: by_type(getattr(found, field)) for field in grid}
        out_of_fold.update({i: scores(i, found_values, found) for i in held_out})
        fold_records.append({"images": held_out, "postprocess": {field: found_values[field] for field in grid}})
    post = coordinate_search(scores, image_ids, start, grid, rounds)
    post_values = {field: by_type(getattr(post, field)) for field in grid}
    per_image = {
        "params": {i: scores(i, start_values, start) for i in image_ids},
        "tuned": {i: scores(i, post_values, post) for i in image_ids},
        "cross_validated": out_of_fold,
    }
    return Tuning(_validated(post), {name: _by_group(per_image[name], store) for name in RESULTS}, fold_records)


def _validated(post: BaseModel) -> BaseModel:
    return type(post).model_validate(post.model_dump())


def _by_group(per_image: Mapping[str, float], store: ImageStore) -> dict[str, float]:
    """Mean image score overall (``all``) and per true cell type, as the competition's mAP is."""
    groups: dict[str, list[float]] = {"all": list(per_image.values())}
    for image_id, score in per_image.items():
        groups.setdefault(store.cell_type(image_id), []).append(score)
    return {group: float(np.mean(values)) for group, values in groups.items()}


def write_tuning(path: Path, tuning: Tuning, state: Mapping[str, Any], *, tta: bool, search: dict) -> None:
    """The tuned-post-processing file of the loaded checkpoint ``state``: what :func:`read_tuned` reads, plus the
    search and its scores."""
    write_json(
        path,
        {
            "model": state["model"],
            "checkpoint_sha256": content_hash(state),
            "tta": tta,
            "postprocess": tuning.post.model_dump(),
            "map": tuning.scores,
            "search": search,
            "folds": tuning.folds,
        },
    )


def tuning_metrics(tuning: Tuning) -> dict[str, float]:
    """Flat ``<result>/map[/cell type]`` figures and ``gain[/cell type]`` (cross-validated minus params)."""
    metrics = {}
    for name, groups in tuning.scores.items():
        for group, value in groups.items():
            metrics[f"{name}/map" + ("" if group == "all" else f"/{group}")] = value
    for group, value in tuning.scores["cross_validated"].items():
        metrics["gain" + ("" if group == "all" else f"/{group}")] = value - tuning.scores["params"][group]
    return metrics


def read_tuned(path: Path, state: Mapping[str, Any], tta: bool | None = None) -> BaseModel:
    """The post-processing a tune stage file holds for the loaded checkpoint ``state``: :func:`read_tuning`'s."""
    return read_tuning(path, state, tta)[0]


def read_tuning(path: Path, state: Mapping[str, Any], tta: bool | None = None) -> tuple[BaseModel, bool]:
    """The post-processing a tune stage file holds for the loaded checkpoint ``state`` (as its model's
    post-processing params, :mod:`cellseg.registry`), and whether it was searched on test-time-augmented
    outputs; a file of another model or
    another checkpoint (retrained since), or one that is not such a file, raises :class:`DataError`. With
    ``tta`` (whether the caller predicts with test-time augmentation), a file searched on the other kind of
    outputs is used with a warning: its values were best for those."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable tuned post-processing file ({type(exc).__name__})") from None
    if not isinstance(record, dict) or not {"model", "checkpoint_sha256", "postprocess"} <= record.keys():
        raise DataError(f"{path}: not a tuned post-processing file (no model, checkpoint_sha256 or postprocess)")
    if record["model"] != state["model"]:
        raise DataError(f"{path}: tuned for model {record['model']!r}, not for this {state['model']} checkpoint")
    if record["checkpoint_sha256"] != content_hash(state):
        raise DataError(f"{path}: tuned for another checkpoint (the model was trained again since); rerun the tune stage")
    if tta is not None and isinstance(record.get("tta"), bool) and record["tta"] != tta:
        tuned_on, used = ("test-time-augmented", "without TTA") if record["tta"] else ("plain", "with TTA")
        log.warning(
            "%s: tuned on %s outputs, used %s: its values may not be the best here (rerun the tune stage with "
            "evaluate.tta matching this run)", path, tuned_on, used,
        )
    try:
        return MODELS[state["model"]].postprocess.model_validate(record["postprocess"]), record.get("tta") is True
    except ValidationError as exc:
        error = exc.errors()[0]
        raise DataError(f"{path}: postprocess.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


def tuned_summary(path: Path) -> str:
    """One line for a report: where a (read, so valid) tune stage file's values come from and what they scored."""
    scores = {kind: groups["all"] for kind, groups in json.loads(Path(path).read_text())["map"].items()}
    return (
        f"tuned per cell type on the validation images by the tune stage (`{path}`): its search scored mAP "
        f"{scores['params']:.3f} with params.yaml's values, {scores['tuned']:.3f} with those it found and "
        f"{scores['cross_validated']:.3f} cross-validated (each fold with the values found on the others)"
    )
