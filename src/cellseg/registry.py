"""The models cellseg trains, one entry each: all that inference, evaluation and the report know of a model.

A model is added with one module under ``cellseg/models/``, one entry in :data:`MODELS`, its params and
post-processing sections (:mod:`cellseg.config`) and its training stage; nothing else branches on model names.
(A module of its own, not ``cellseg/models/__init__.py``: importing a model module runs its package first,
which would import every model module in turn.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from cellseg.config import MaskRCNNParams, MaskRCNNPostprocess, UNetParams, UNetPostprocess
from cellseg.instances import Predictor
from cellseg.models import maskrcnn, unet
from cellseg.models.unet_targets import unet_target


@dataclass(frozen=True)
class ModelEntry:
    """What is known of one model."""

    name: str  # as checkpoints, metrics and params sections name it
    display: str  # as the report names it
    params: type[BaseModel]  # its params section (``<name>``), stored in its checkpoints
    postprocess: type[BaseModel]  # its post-processing params (``postprocess.<name>``), also stored
    architecture: Callable[[Any], torch.nn.Module]  # the untrained model its params describe (no download)
    describe: Callable[[Any], str]  # its params → how it finds cells, in a sentence (the report's)
    # (trained model, params, post-processing params, device, test-time augmentation) → whole-image inference
    predictor: Callable[[torch.nn.Module, Any, Any, torch.device, bool], Predictor]


def _describe_unet(params: UNetParams) -> str:
    return (
        f"The U-Net {unet_target(params).how}; a classification head on its encoder names the image's cell "
        "type, which every cell gets; a cell's confidence is its mean foreground probability."
    )


def _describe_maskrcnn(params: MaskRCNNParams) -> str:
    return (
        f"Mask R-CNN ({params.backbone}) detects each cell with its own mask, cell type and confidence (shown on "
        "the overlays); overlapping masks are resolved in favour of the more confident cell."
    )


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "unet", "U-Net (EfficientNet-B0)", UNetParams, UNetPostprocess, unet.architecture, _describe_unet,
            unet.UNetPredictor,
        ),
        ModelEntry(
            "maskrcnn", "Mask R-CNN", MaskRCNNParams, MaskRCNNPostprocess, maskrcnn.architecture,
            _describe_maskrcnn, maskrcnn.MaskRCNNPredictor,
        ),
    )
}
