"""Inference shared by ``evaluate`` and ``cellseg predict``: a trained checkpoint → instances per image.

Every model's predictions end as :class:`~cellseg.instances.Instances`; which model a checkpoint holds, and
how to rebuild it, the registry says (:mod:`cellseg.registry`). Nothing of the truth is used: the U-Net's classification head names the image's cell type (every cell gets
it; its confidence is the cell's mean foreground probability), Mask R-CNN names each cell's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ValidationError

from cellseg import rle
from cellseg.checkpoint import load_checkpoint
from cellseg.cocorle import batched, rle_to_coco
from cellseg.errors import DataError
from cellseg.instances import Instances, Predictor
from cellseg.registry import MODELS

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)


def load_predictor(
    checkpoint: str | Path, device: torch.device, post: BaseModel | None = None, tta: bool = False
) -> Predictor:
    """Rebuild the model a checkpoint file was trained as: :func:`predictor` of the loaded checkpoint."""
    return predictor(load_checkpoint(checkpoint), checkpoint, device, post, tta)


def predictor(
    state: Mapping[str, Any], checkpoint: str | Path, device: torch.device, post: BaseModel | None = None,
    tta: bool = False,
) -> Predictor:
    """Rebuild the model of a loaded checkpoint ``state`` (its params are stored in it) with its weights.

    ``post``, the model's ``postprocess.<name>`` params, replaces the post-processing params stored at
    training, so that thresholds can be tuned without retraining; ``tta`` asks for test-time augmentation.
    Errors name the ``checkpoint`` file.
    """
    name = state["model"]
    if name not in MODELS:
        raise DataError(f"{checkpoint}: checkpoint of unknown model {name!r}; cellseg knows {', '.join(MODELS)}")
    entry = MODELS[name]
    missing = [key for key in ("model_params", "postprocess", "model_state") if not isinstance(state.get(key), dict)]
    if missing:
        raise DataError(f"{checkpoint}: {name} checkpoint without {' or '.join(missing)}: not a trained model's checkpoint")
    if post is not None and not isinstance(post, entry.postprocess):
        raise TypeError(f"{name} post-processing takes {entry.postprocess.__name__}, not {type(post).__name__}")
    params = _stored(entry.params, state, "model_params", checkpoint)
    model = entry.architecture(params)
    _load_weights(model, state["model_state"], checkpoint, name)
    post = post or _stored(entry.postprocess, state, "postprocess", checkpoint)
    return entry.predictor(model, params, post, device, tta)


def _stored(model: type[P], state: Mapping[str, Any], key: str, checkpoint: str | Path) -> P:
    """The params stored under ``key`` in a checkpoint's ``state``, validated; invalid ones raise :class:`DataError`."""
    try:
        return model.model_validate(state[key])
    except ValidationError as exc:
        error = exc.errors()[0]
        raise DataError(
            f"{checkpoint}: stored {key} are invalid ({'.'.join(map(str, error['loc']))}: {error['msg']})"
        ) from None


def _load_weights(model: torch.nn.Module, state_dict: dict, checkpoint: str | Path, name: str) -> None:
    """Load a checkpoint's weights; weights that do not fit the model raise :class:`DataError`."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{checkpoint}: its weights do not fit the {name} model its params describe ({reason})") from None


def coco_results(instances: Instances, image_id: int) -> list[dict]:
    """COCO result dicts (compressed RLE segmentation, bbox, category, score) for one image's instances, made
    from the label image's runs (:func:`cellseg.rle.encode_labels`, :func:`cellseg.cocorle.rle_to_coco`): no
    full-size mask per instance, so a large image with thousands of cells costs one sort."""
    labels, n = instances.labels, len(instances)
    height, width = labels.shape
    rles = rle_to_coco(rle.encode_labels(labels)[:n], np.full(n, height), np.full(n, width))
    boxes = batched(mask_utils.toBbox, rles).reshape(-1, 4)
    return [
        {
            "image_id": image_id,
            "category_id": int(instances.classes[k]),
            "segmentation": segmentation,
            "bbox": [float(v) for v in boxes[k]],
            "score": float(instances.scores[k]),
        }
        for k, segmentation in enumerate(rles)
    ]
