"""``cellseg predict``: segment a lab's own images (no annotations needed) with a trained checkpoint.

Images of any size, bit depth and colour are read by :mod:`cellseg.lab_images`' rules and segmented at the
models' size (:mod:`cellseg.tiling`: padded or tiled; ``scale`` resizes first). The post-processing is the tune
stage's (``postprocess.json`` beside the checkpoint) when it is there. The outputs, in one directory written
atomically (an existing non-empty one is only replaced with ``overwrite``, and only when cellseg wrote it:
:mod:`cellseg.outputs`), each one of :data:`cellseg.exports.OUTPUTS` that ``outputs`` names:

* ``labels``: ``labels/<stem>.tif``, the label image (:func:`cellseg.exports.write_label_tiff`);
* ``overlay``: ``overlays/<stem>.png``, cells filled with their type's colour (more opaque the more confident);
* ``rois``: ``rois/<stem>.zip``, one ImageJ/Fiji polygon ROI per cell (no file for an image without cells);
* ``measurements``: ``cells.csv``, one row per cell (:func:`cellseg.measure.cell_measurements`);
* ``summary``: ``images.csv``, one row per image (cells per type, confluence, mean cell area);
* ``coco``: ``predictions.json``, COCO results with each instance's class and score, plus the image list with
  each image's predicted cell type;
* ``submission``: ``submission.csv`` in the Kaggle format (``id,predicted``: one row per instance, competition
  RLE, masks non-overlapping; an image with no instance gets one row with an empty prediction).

An unreadable image stops the run, naming it, before anything is written; with ``skip_bad`` it is reported
(a warning, and ``skipped.csv``: file and reason) and the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd
import torch
from pydantic import BaseModel
from tqdm import tqdm

from cellseg import rle
from cellseg.checkpoint import load_checkpoint
from cellseg.errors import DataError
from cellseg.exports import OUTPUTS, write_label_tiff, write_overlay, write_rois
from cellseg.inference import coco_results
from cellseg.inference import predictor as model_predictor
from cellseg.instances import Instances
from cellseg.io import atomic_path, write_json
from cellseg.lab_images import IMAGE_SUFFIXES, LabImage, image_shape, read_image
from cellseg.measure import cell_measurements, image_summary
from cellseg.outputs import Kind, check_outputs
from cellseg.tiling import segment_any_size
from cellseg.tune import TUNED_FILE, read_tuning

log = logging.getLogger(__name__)

FOLDERS = {"labels": "labels", "overlay": "overlays", "rois": "rois"}


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named, or found (sorted) in the directories named; stems must be unique. What a
    directory holds besides images (by suffix: :data:`~cellseg.lab_images.IMAGE_SUFFIXES`) is left, with a
    warning that lists it."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = sorted(item.iterdir())
            found = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            chosen = set(found)
            if others := [p.name for p in entries if p not in chosen]:
                log.warning("%s: left %d entr(ies) that are not image files (%s): %s", item, len(others),
                            ", ".join(IMAGE_SUFFIXES), ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such image file or directory")
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_SUFFIXES)})")
    stems = pd.Series([p.stem for p in paths])
    if stems.duplicated().any():
        raise DataError(f"two input images share the id {stems[stems.duplicated()].iloc[0]!r}; ids are file stems")
    return paths


def submission_rows(image_id: str, labels) -> list[dict[str, str]]:
    """Kaggle submission rows for one image: one per instance, or one empty row when there is none."""
    rows = [{"id": image_id, "predicted": text} for text in rle.encode_labels(labels) if text]
    return rows or [{"id": image_id, "predicted": ""}]


def _postprocess(choice: str | Path, state: dict, checkpoint: Path, tta: bool | None) -> tuple[BaseModel | None, bool]:
    """The post-processing ``predict_images``' ``postprocess`` names (None: the checkpoint's own), and whether to
    use test-time augmentation: ``tta``, or where it is None, as the tuned file was searched (off without one)."""
    path = checkpoint.parent / TUNED_FILE if choice == "auto" else Path(choice)
    if choice == "stored" or (choice == "auto" and not path.is_file()):
        if choice == "auto":
            log.info("post-processing: the values stored in %s (no %s beside it)", checkpoint, TUNED_FILE)
        return None, bool(tta)
    log.info("post-processing: tuned, from %s", path)
    post, searched_with_tta = read_tuning(path, state, tta)
    if tta is None:
        tta = searched_with_tta
        log.info("test-time augmentation: %s, as %s was searched", "on" if tta else "off", path)
    return post, tta


def predict_images(
    checkpoint: Path,
    inputs: Sequence[str | Path],
    out: Path,
    *,
    overwrite: bool = False,
    batch_size: int = 4,
    device: torch.device,
    tta: bool | None = None,
    postprocess: str | Path = "auto",
    scale: float = 1.0,
    overlap: int = 192,
    outputs: Collection[str] = OUTPUTS,
    skip_bad: bool = False,
) -> dict[str, int]:
    """Segment every input image and write the ``outputs`` of the module docstring into ``out``.

    ``tta``: with test-time augmentation or not (None: as the tuned file was searched; off without one);
    ``postprocess``: ``auto`` (the tune stage's file beside the checkpoint when there is one, else the values
    stored in the checkpoint), ``stored``, or a tune stage's file;
    ``scale``: the factor that gives the images the competition's pixel size; ``overlap``: of the tiles of
    large images; ``batch_size``: tiles per forward pass. Returns the counts of images, cells and skipped files.
    """
    if unknown := set(outputs) - set(OUTPUTS):
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(OUTPUTS)}")
    started = time.perf_counter()
    out = Path(out)
    named = [Path(postprocess)] if postprocess not in ("auto", "stored") else []
    check_outputs([(out, Kind.TREE)], [*map(Path, inputs), Path(checkpoint), *named], overwrite=overwrite)
    skipped: list[dict[str, str]] = []
    paths = [p for p in find_images(inputs) if _unless_bad(image_shape, p, skip_bad, skipped) is not None]
    state = load_checkpoint(checkpoint)
    post, tta = _postprocess(postprocess, state, Path(checkpoint), tta)
    predictor = model_predictor(state, checkpoint, device, post, tta)
    tables = _Tables(outputs)
    with atomic_path(out, directory=True) as tmp:
        for output in set(outputs) & set(FOLDERS):
            (tmp / FOLDERS[output]).mkdir()
        for path in tqdm(paths, desc="predict", unit="image"):
            if (image := _unless_bad(read_image, path, skip_bad, skipped)) is None:
                continue
            found = segment_any_size(predictor, image.model_input, scale=scale, overlap=overlap, batch_size=batch_size)
            _write_image_files(tmp, outputs, image, found)
            tables.add(image, found)
        tables.write(tmp, predictor.name, skipped)
    cells = sum(row["cells"] for row in tables.summaries)
    log.info(
        "predicted %d cells in %d images%s into %s in %.1f s (%s)", cells, len(tables.summaries),
        f" ({len(skipped)} unreadable file(s) skipped: {out / 'skipped.csv'})" if skipped else "", out,
        time.perf_counter() - started, predictor.name,
    )
    return {"images": len(tables.summaries), "instances": cells, "skipped": len(skipped)}


T = TypeVar("T")


def _unless_bad(read: Callable[[Path], T], path: Path, skip_bad: bool, skipped: list[dict[str, str]]) -> T | None:
    """``read(path)``; with ``skip_bad``, a :class:`DataError` is reported (a warning, a record in ``skipped``)
    and gives None, where without it it stops the run."""
    try:
        return read(path)
    except DataError as exc:
        if not skip_bad:
            raise
        log.warning("skipped: %s", exc)
        skipped.append({"file": str(path), "reason": str(exc)})
        return None


class _Tables:
    """The outputs that gather rows from every image: COCO results, submission, measurements and summary."""

    def __init__(self, outputs: Collection[str]) -> None:
        self.outputs = outputs
        self.images: list[dict] = []
        self.results: list[dict] = []
        self.rows: list[dict[str, str]] = []
        self.cells: list[pd.DataFrame] = []
        self.summaries: list[dict] = []

    def add(self, image: LabImage, found: Instances) -> None:
        """One image's rows."""
        number, stem = len(self.images) + 1, image.path.stem
        height, width = found.labels.shape
        self.images.append({"id": number, "file_name": str(image.path), "image_key": stem, "height": height,
                            "width": width, "cell_type": found.image_type, "kind": image.kind})
        if "coco" in self.outputs:
            self.results += coco_results(found, number)
        if "submission" in self.outputs:
            self.rows += submission_rows(stem, found.labels)
        if "measurements" in self.outputs:
            self.cells.append(cell_measurements(stem, found, image.grey))
        self.summaries.append(image_summary(stem, found))

    def write(self, folder: Path, model: str, skipped: list[dict[str, str]]) -> None:
        """The tables asked for into ``folder``, and ``skipped.csv`` when a file was skipped."""
        if "coco" in self.outputs:
            write_json(folder / "predictions.json", {"model": model, "images": self.images, "annotations": self.results})
        if "submission" in self.outputs:
            pd.DataFrame(self.rows, columns=["id", "predicted"]).to_csv(folder / "submission.csv", index=False)
        if "measurements" in self.outputs:
            cells = pd.concat(self.cells, ignore_index=True) if self.cells else pd.DataFrame()
            cells.to_csv(folder / "cells.csv", index=False)
        if "summary" in self.outputs:
            pd.DataFrame(self.summaries).to_csv(folder / "images.csv", index=False)
        if skipped:
            pd.DataFrame(skipped).to_csv(folder / "skipped.csv", index=False)


def _write_image_files(folder: Path, outputs: Collection[str], image: LabImage, found: Instances) -> None:
    """One image's files among ``outputs``: its label TIFF, overlay and ROI zip."""
    stem = image.path.stem
    if "labels" in outputs:
        write_label_tiff(folder / FOLDERS["labels"] / f"{stem}.tif", found.labels)
    if "overlay" in outputs:
        write_overlay(folder / FOLDERS["overlay"] / f"{stem}.png", image.model_input, found)
    if "rois" in outputs:
        write_rois(folder / FOLDERS["rois"] / f"{stem}.zip", found)
