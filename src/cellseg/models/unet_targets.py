"""The U-Net's two pixel targets (``unet.target``), and how each one's outputs become instances.

- ``boundary``: three classes (background, interior, boundary), cross-entropy (+ Dice), and a
  marker-controlled watershed of the class probabilities.
- ``flows``: cellpose's representation (:mod:`cellseg.flows`): 5 × the flows (dy, dx), learnt by mean squared
  error (halved, as cellpose does), and a cell-probability logit, by binary cross-entropy; instances come back
  through cellpose's dynamics. The flows are computed once, by the flows stage.

Both have three output channels, so the network is the same. Each target makes an image's pixel targets from
its label image, gives the loss, the foreground, the per-pixel confidence and the instances of its outputs,
says which post-processing values it reads and whether its maps hold vectors (which test-time augmentation
turns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from cellseg.celltypes import per_type
from cellseg.config import UNetParams, UNetPostprocess
from cellseg.data import IGNORE_INDEX, targets_from_labels
from cellseg.flows import FLOW_SCALE, read_flows
from cellseg.postprocess import INTERIOR, BOUNDARY, Memo, flow_instances, watershed_instances


class BoundaryTarget:
    """Background, interior and boundary classes; a watershed makes the instances."""

    vectors = False
    post_fields = ("marker_threshold", "mask_threshold", "min_size")  # the post-processing values it reads
    how = "labels pixels (background / interior / boundary) and splits touching cells by watershed"

    def __init__(self, params: UNetParams) -> None:
        self.params = params
        self.dice_loss = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)

    def pixel_targets(self, image_id: str, labels: np.ndarray) -> np.ndarray:
        """The uint8 H×W class map of a label image."""
        return targets_from_labels(labels, self.params.boundary_width)

    def losses(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (and, for ``ce_dice``, the multiclass Dice loss); padding is :data:`IGNORE_INDEX`."""
        losses = {"ce": F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)}
        if self.params.loss == "ce_dice":
            losses["dice_loss"] = self.dice_loss(logits.float(), target)
        return losses

    def foreground(self, logits: torch.Tensor) -> torch.Tensor:
        """Pixels whose likeliest class is a cell's (N×H×W bool)."""
        return logits.argmax(dim=1) != 0

    def true_foreground(self, target: torch.Tensor) -> torch.Tensor:
        return (target != 0) & (target != IGNORE_INDEX)

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities."""
        return logits.float().softmax(dim=1)

    def confidence(self, maps: np.ndarray) -> np.ndarray:
        """Each pixel's probability of being a cell's."""
        return maps[INTERIOR] + maps[BOUNDARY]

    def instances(self, maps: np.ndarray, post: UNetPostprocess, cell_type: str, memo: Memo | None = None) -> np.ndarray:
        """The watershed's uint16 label image, with ``post``'s values for the (predicted) ``cell_type``."""
        return watershed_instances(
            maps, marker_threshold=per_type(post.marker_threshold, cell_type),
            mask_threshold=per_type(post.mask_threshold, cell_type), min_size=per_type(post.min_size, cell_type),
            memo=memo,
        )


class FlowTarget:
    """Cellpose's flows and cell probability; its dynamics make the instances."""

    vectors = True
    post_fields = ("cellprob_threshold", "flow_threshold", "min_size")
    how = "predicts cellpose's flows and a cell probability; cellpose's dynamics follow the flows to each cell"

    def __init__(self, params: UNetParams, flows_dir: Path | None = None) -> None:
        self.params, self.flows_dir = params, flows_dir

    def pixel_targets(self, image_id: str, labels: np.ndarray) -> np.ndarray:
        """The H×W×3 float16 map (5 dy, 5 dx, cell or not) of an image, from the flows stage's file."""
        if self.flows_dir is None:
            raise ValueError("flow targets need the flows stage's folder")
        flows = read_flows(self.flows_dir, image_id, labels.shape)
        return np.stack([FLOW_SCALE * flows[0], FLOW_SCALE * flows[1], labels > 0], axis=-1).astype(np.float16)

    def losses(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Half the mean squared error of the flows and the cell probability's binary cross-entropy, over the
        ``valid`` (N×H×W) pixels."""
        logits, weight = logits.float(), valid.unsqueeze(1).float()
        pixels = weight.sum().clamp(min=1.0)
        mse = ((logits[:, :2] - target[:, :2]) ** 2 * weight).sum() / (2 * pixels)  # over both components
        bce = F.binary_cross_entropy_with_logits(logits[:, 2:], target[:, 2:], weight=weight, reduction="sum") / pixels
        return {"flow_mse": mse / 2, "cellprob_bce": bce}

    def foreground(self, logits: torch.Tensor) -> torch.Tensor:
        """Pixels whose cell probability is above one half."""
        return logits[:, 2] > 0

    def true_foreground(self, target: torch.Tensor) -> torch.Tensor:
        return target[:, 2] > 0.5

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """The outputs as they are: flows (network scale) and the cell-probability logit."""
        return logits.float()

    def confidence(self, maps: np.ndarray) -> np.ndarray:
        """Each pixel's probability of being a cell's."""
        return 1.0 / (1.0 + np.exp(-maps[2]))

    def instances(self, maps: np.ndarray, post: UNetPostprocess, cell_type: str, memo: Memo | None = None) -> np.ndarray:
        """Cellpose's dynamics' uint16 label image, with ``post``'s values for the (predicted) ``cell_type``."""
        return flow_instances(
            maps[:2], maps[2], cellprob_threshold=per_type(post.cellprob_threshold, cell_type),
            flow_threshold=per_type(post.flow_threshold, cell_type), min_size=per_type(post.min_size, cell_type),
            memo=memo,
        )


def unet_target(params: UNetParams, flows_dir: Path | None = None) -> BoundaryTarget | FlowTarget:
    """The target ``params.target`` names (a flow target reads its training targets from ``flows_dir``)."""
    if params.target == "flows":
        return FlowTarget(params, flows_dir)
    return BoundaryTarget(params)
