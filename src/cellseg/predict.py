"""``cellseg predict``: segment new images (no annotations needed) with a trained checkpoint.

Writes, in one directory (created atomically; an existing non-empty one is only replaced with
``overwrite``, and only when cellseg wrote it: :mod:`cellseg.outputs`): ``labels/<stem>.png`` (uint16 instance labels), ``predictions.json`` (COCO results with
the predicted class and score per instance, plus the image list with each image's predicted cell type) and
``submission.csv`` in the Kaggle format (``id,predicted``:
one row per instance, competition RLE, masks non-overlapping; an image with no instance gets one row with
an empty prediction). The post-processing is the tune stage's (``postprocess.json`` beside the checkpoint)
when it is there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from tqdm import tqdm

from cellseg import rle
from cellseg.checkpoint import load_checkpoint
from cellseg.errors import DataError
from cellseg.inference import coco_results
from cellseg.inference import predictor as model_predictor
from cellseg.io import atomic_path, image_size, read_gray, write_json, write_png
from cellseg.outputs import Kind, check_outputs
from cellseg.tune import TUNED_FILE, read_tuned

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MAX_PIXELS = 4096 * 4096  # 46 Sartorius images' worth


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named, or found (sorted) in the directories named; stems must be unique, and each file
    a readable image of at most :data:`MAX_PIXELS` (its header is read). What a directory holds besides images
    (by suffix: :data:`IMAGE_SUFFIXES`) is left, with a warning that lists it."""
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
    for path in paths:
        width, height = image_size(path)
        if width * height > MAX_PIXELS:
            raise DataError(
                f"{path}: {width}x{height} pixels, more than cellseg segments in one piece ({MAX_PIXELS:,}); crop or tile it"
            )
    return paths


def submission_rows(image_id: str, labels: np.ndarray) -> list[dict[str, str]]:
    """Kaggle submission rows for one image: one per instance, or one empty row when there is none."""
    n = int(labels.max())
    if n == 0:
        return [{"id": image_id, "predicted": ""}]
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
    rows = [
        {"id": image_id, "predicted": rle.encode_pixels(order[bounds[k] : bounds[k + 1]])}  # stable sort: ascending
        for k in range(n)
        if bounds[k + 1] > bounds[k]
    ]
    return rows or [{"id": image_id, "predicted": ""}]


def _postprocess(choice: str | Path, state: dict, checkpoint: Path) -> BaseModel | None:
    """The post-processing ``predict_images``' ``postprocess`` names (None: the checkpoint's own)."""
    if choice == "stored":
        return None
    path = checkpoint.parent / TUNED_FILE if choice == "auto" else Path(choice)
    if choice == "auto" and not path.is_file():
        log.info("post-processing: the values stored in %s (no %s beside it)", checkpoint, TUNED_FILE)
        return None
    log.info("post-processing: tuned, from %s", path)
    return read_tuned(path, state)


def predict_images(
    checkpoint: Path,
    inputs: Sequence[str | Path],
    out: Path,
    *,
    overwrite: bool = False,
    batch_size: int = 4,
    device: torch.device,
    tta: bool = False,
    postprocess: str | Path = "auto",
) -> dict[str, int]:
    """Segment every input image (``tta``: with test-time augmentation) and write the outputs described in the
    module docstring. ``postprocess``: ``auto`` (the tune stage's file beside the checkpoint when there is one,
    else the values stored in the checkpoint), ``stored``, or a tune stage's file."""
    out = Path(out)
    named = [Path(postprocess)] if postprocess not in ("auto", "stored") else []
    check_outputs([(out, Kind.TREE)], [*map(Path, inputs), Path(checkpoint), *named], overwrite=overwrite)
    paths = find_images(inputs)
    state = load_checkpoint(checkpoint)
    predictor = model_predictor(state, checkpoint, device, _postprocess(postprocess, state, Path(checkpoint)), tta)
    images_meta, results, rows = [], [], []
    with atomic_path(out, directory=True) as tmp:
        (tmp / "labels").mkdir()
        for first in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
            batch = paths[first : first + batch_size]
            images = [read_gray(p) for p in batch]
            for number, path, image, found in zip(
                range(first + 1, first + len(batch) + 1), batch, images, predictor.predict(images)
            ):
                write_png(tmp / "labels" / f"{path.stem}.png", found.labels)
                images_meta.append({"id": number, "file_name": str(path), "image_key": path.stem,
                                    "height": image.shape[0], "width": image.shape[1], "cell_type": found.image_type})
                results += coco_results(found, number)
                rows += submission_rows(path.stem, found.labels)
        write_json(tmp / "predictions.json", {"model": predictor.name, "images": images_meta, "annotations": results})
        pd.DataFrame(rows, columns=["id", "predicted"]).to_csv(tmp / "submission.csv", index=False)
    log.info("predicted %d instances in %d images into %s", len(results), len(paths), out)
    return {"images": len(paths), "instances": len(results)}
