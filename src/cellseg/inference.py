"""Inference shared by ``evaluate`` and ``cellseg predict``: a trained checkpoint → instances per image.

Every model's predictions end as :class:`Instances`: a non-overlapping uint16 label image plus, per
instance, a category id (1 + the index in ``CELL_TYPES``) and a confidence, and the image's cell type.
Nothing of the truth is used: the U-Net's classification head names the image's cell type (every cell gets
it; its confidence is the cell's mean foreground probability), Mask R-CNN names each cell's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ValidationError

from cellseg.checkpoint import load_checkpoint
from cellseg.config import MaskRCNNParams, UNetParams
from cellseg.data import padded_input
from cellseg.errors import DataError
from cellseg.sources import CELL_TYPES

log = logging.getLogger(__name__)

UNKNOWN_CLASS = 0
P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Instances:
    """One image's instances: ``labels`` (uint16 H×W, instance k at label k+1), ``classes`` and ``scores`` per k,
    and ``image_class``, the category the model gives the whole image (:data:`UNKNOWN_CLASS` if none)."""

    labels: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    image_class: int = UNKNOWN_CLASS

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def image_type(self) -> str | None:
        """The cell type the model gives the image, or None."""
        return CELL_TYPES[self.image_class - 1] if self.image_class else None


def majority_class(classes: np.ndarray) -> int:
    """The most frequent category of an image's cells (ties: the lowest id), or :data:`UNKNOWN_CLASS` if none."""
    return int(np.bincount(classes).argmax()) if len(classes) else UNKNOWN_CLASS


class Predictor(Protocol):
    """A trained model ready to segment whole grey images."""

    name: str

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Instances of each uint8 H×W image."""


class UNetPredictor:
    """U-Net probabilities → marker-controlled watershed instances, all of the image's predicted cell type."""

    name = "unet"

    def __init__(self, model: torch.nn.Module, params: UNetParams, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.params = params
        self.device = device

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(3, H, W) class probabilities of one whole image (padded to a multiple of 32 for the network) and
        its cell-type probabilities (one per ``CELL_TYPES``)."""
        height, width = image.shape
        tensor, _ = padded_input(image, self.params.mean, self.params.std, self.params.channels)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits, type_logits = self.model(tensor.unsqueeze(0).to(self.device))
        probs = logits.float().softmax(dim=1)[0, :, :height, :width].cpu().numpy()
        return probs, type_logits.float().softmax(dim=1)[0].cpu().numpy()

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        from cellseg.models.unet import unet_instances

        results = []
        for image in images:
            probs, type_probs = self.probabilities(image)
            type_index = int(type_probs.argmax())
            labels = unet_instances(probs, CELL_TYPES[type_index], self.params)
            n = int(labels.max())
            foreground = probs[1] + probs[2]
            sums = np.bincount(labels.ravel(), weights=foreground.ravel(), minlength=n + 1)[1:]
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            scores = sums / np.maximum(sizes, 1)
            classes = np.full(n, type_index + 1, dtype=np.int64)
            results.append(Instances(labels, classes, scores.astype(np.float32), image_class=type_index + 1))
        return results


POSTPROCESS_PARAMS = {
    "unet": ("marker_threshold", "mask_threshold", "min_size"),
    "maskrcnn": ("mask_threshold", "score_threshold", "min_size"),
}


def postprocess_params(section: BaseModel, name: str) -> dict[str, Any]:
    """The post-processing params (:data:`POSTPROCESS_PARAMS`) of model ``name`` in its params ``section``, as
    :func:`load_predictor` overrides the ones stored at training."""
    return {key: getattr(section, key) for key in POSTPROCESS_PARAMS[name]}


def load_predictor(
    checkpoint: str | Path, device: torch.device, postprocess: Mapping[str, Any] | None = None
) -> Predictor:
    """Rebuild the model a checkpoint was trained as (its params are stored in it) and load its weights.

    ``postprocess`` overrides the stored post-processing params (:data:`POSTPROCESS_PARAMS`), so that
    thresholds can be tuned without retraining; other keys are refused.
    """
    state = load_checkpoint(checkpoint)
    name = state["model"]
    if name not in ("unet", "maskrcnn"):
        raise DataError(f"{checkpoint}: checkpoint of unknown model {name!r}")
    missing = [key for key in ("model_params", "model_state") if not isinstance(state.get(key), dict)]
    if missing:
        raise DataError(f"{checkpoint}: {name} checkpoint without {' or '.join(missing)}: not a trained model's checkpoint")
    unknown = set(postprocess or {}) - set(POSTPROCESS_PARAMS[name])
    if unknown:
        raise ValueError(f"not post-processing params of {name}: {sorted(unknown)}")
    state["model_params"] = {**state["model_params"], **(postprocess or {})}
    if name == "unet":
        from cellseg.models.unet import build_unet

        params = _stored_params(UNetParams, state["model_params"], checkpoint)
        model = build_unet(
            encoder=params.encoder, weights="none", in_channels=params.channels, classes=3,
            decoder_channels=params.decoder_channels,
        )
        _load_weights(model, state["model_state"], checkpoint, name)
        return UNetPredictor(model, params, device)
    from cellseg.models.maskrcnn import MaskRCNNPredictor, build_maskrcnn

    params = _stored_params(MaskRCNNParams, {**state["model_params"], "weights": "none"}, checkpoint)
    model = build_maskrcnn(params)
    _load_weights(model, state["model_state"], checkpoint, name)
    return MaskRCNNPredictor(model, params, device)


def _stored_params(model: type[P], values: dict, checkpoint: str | Path) -> P:
    """The model params stored in a checkpoint, validated; invalid ones raise :class:`DataError`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise DataError(
            f"{checkpoint}: stored model_params are invalid ({'.'.join(map(str, error['loc']))}: {error['msg']})"
        ) from None


def _load_weights(model: torch.nn.Module, state_dict: dict, checkpoint: str | Path, name: str) -> None:
    """Load a checkpoint's weights; weights that do not fit the model raise :class:`DataError`."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{checkpoint}: its weights do not fit the {name} model its params describe ({reason})") from None


def coco_results(instances: Instances, image_id: int, chunk: int = 64) -> list[dict]:
    """COCO result dicts (compressed RLE segmentation, bbox, category, score) for one image's instances.

    Masks are encoded ``chunk`` instances at a time, bounding memory to ``chunk`` full-size masks.
    """
    labels, n = instances.labels, len(instances)
    results = []
    for first in range(0, n, chunk):
        ids = np.arange(first + 1, min(first + chunk, n) + 1, dtype=labels.dtype)
        rles = mask_utils.encode(np.asfortranarray((labels[..., None] == ids).astype(np.uint8)))
        boxes = mask_utils.toBbox(rles)
        for rle, box, k in zip(rles, boxes, ids - 1):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(instances.classes[k]),
                    "segmentation": rle,
                    "bbox": [float(v) for v in box],
                    "score": float(instances.scores[k]),
                }
            )
    return results
