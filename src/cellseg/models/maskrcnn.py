"""Mask R-CNN (torchvision) sized for cells: build, data, training task, instances and predictor.

``backbone`` (``maskrcnn.backbone``): ResNet-18/34/50 FPN (torchvision's v1 design), ResNet-50 FPN v2, or
MobileNetV3-Large FPN. ``weights`` (``maskrcnn.weights``): ``"none"`` → random init; ``"imagenet"`` → the
backbone's ImageNet weights (torchvision's download), the rest random; ``"coco"`` → torchvision's COCO Mask
R-CNN download (ResNet-50 FPN and FPN v2 only) with new 4-class box/mask predictors (and new RPN logits when
the anchors per location differ); any other string → a local ``torch.save`` file holding a full Mask R-CNN
state dict of that backbone, or a dict with a ``"model_state"`` (a cellseg checkpoint), ``"state_dict"`` or
``"model"`` entry holding one. Predictor tensors of another shape in such a file (e.g. a COCO 91-class file)
stay randomly initialised; every other key must fit.

Category ids are those of :mod:`cellseg.celltypes`; 0 is background.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet34_Weights, ResNet50_Weights
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor as MaskPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d

from cellseg.celltypes import CELL_TYPES, by_category, category_id
from cellseg.checkpoint import read_weights
from cellseg.config import MaskRCNNParams, MaskRCNNPostprocess
from cellseg.data import AugmentedDataset, ImageStore
from cellseg.decode import INSTANCES_TABLE, instance_pixels
from cellseg.errors import DataError, ParamsError, ResourceError
from cellseg.instances import IMAGE_SHAPE, Instances, majority_class
from cellseg.metrics import CompetitionScore
from cellseg.models.detections import Detections
from cellseg.models.maskrcnn_tta import tta_detections
from cellseg.postprocess import remove_overlaps

log = logging.getLogger(__name__)

PARAM = "maskrcnn.weights"
COCO_MASK_HEAD = 256  # the width of torchvision's mask head, and so of its COCO weights'
MASK_SIZE = 28  # side of the mask head's output (RoIAlign 14 × upsampling 2) that torchvision pastes
# Heads whose tensors depend on the class count or the anchors per location: a file may differ there.
HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.", "rpn.head.cls_logits.", "rpn.head.bbox_pred.")
# ``maskrcnn.backbone`` → its ImageNet weights (``maskrcnn.weights: imagenet``), and where torchvision has them,
# the whole Mask R-CNN's COCO weights (``coco``).
BACKBONE_WEIGHTS = {
    "resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
    "resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
    "resnet34_fpn": ResNet34_Weights.IMAGENET1K_V1,
    "resnet18_fpn": ResNet18_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}
COCO_WEIGHTS = {
    "resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    "resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
}
T = TypeVar("T")


def build_maskrcnn(params: MaskRCNNParams, num_classes: int = 1 + len(CELL_TYPES)) -> nn.Module:
    """The Mask R-CNN of ``params``: its backbone, anchors, sizes and limits, and its weights (see the module
    docstring), with ``num_classes`` outputs (the background and the cell types); a download that fails raises
    :class:`ResourceError`."""
    if params.weights == "coco" and params.backbone not in COCO_WEIGHTS:
        raise ParamsError(
            f"{PARAM}: torchvision has no COCO Mask R-CNN with backbone {params.backbone!r} (only "
            f"{', '.join(COCO_WEIGHTS)}); use imagenet (its backbone's ImageNet weights), none or a local file"
        )
    if params.weights == "coco" and params.mask_head_channels != COCO_MASK_HEAD:
        raise ParamsError(
            f"maskrcnn.mask_head_channels: torchvision's COCO weights have a mask head {COCO_MASK_HEAD} wide, not "
            f"{params.mask_head_channels}; set it to {COCO_MASK_HEAD} with {PARAM}: coco"
        )
    if params.weights == "imagenet":
        model = _download(lambda: _network(params, num_classes, imagenet=True), "ImageNet backbone weights")
    else:
        model = _network(params, num_classes, imagenet=False)
    if params.weights == "coco":
        state = _download(lambda: COCO_WEIGHTS[params.backbone].get_state_dict(progress=True), "COCO Mask R-CNN weights")
        _load_fitting(model, state, "torchvision's COCO weights", params.backbone)
    elif params.weights not in ("none", "imagenet"):
        state = read_weights(Path(params.weights), PARAM, "'none', 'coco', 'imagenet'")
        _load_fitting(model, state, params.weights, params.backbone)
    return model


def architecture(params: MaskRCNNParams) -> nn.Module:
    """The Mask R-CNN ``params`` describe, without downloading anything: a checkpoint's weights go in it."""
    return _network(params, 4, imagenet=False)


def _network(params: MaskRCNNParams, num_classes: int, imagenet: bool) -> nn.Module:
    """The network of ``params``, randomly initialised but for the backbone's ImageNet weights with ``imagenet``.

    As torchvision's builders do, a backbone meant for pretrained weights (``maskrcnn.weights`` coco or imagenet)
    has frozen BatchNorm and its first layers frozen; ResNet-50 FPN v2 keeps trainable BatchNorm throughout.
    """
    options: dict[str, Any] = {
        "min_size": round(IMAGE_SHAPE[0] * params.image_scale),
        "max_size": round(IMAGE_SHAPE[1] * params.image_scale),
        "image_mean": [params.mean] * 3,
        "image_std": [params.std] * 3,
        "box_detections_per_img": params.detections_per_img,
        "box_batch_size_per_image": params.box_batch_size_per_image,
        "rpn_pre_nms_top_n_train": params.rpn_pre_nms_top_n,
        "rpn_pre_nms_top_n_test": params.rpn_pre_nms_top_n,
        "rpn_post_nms_top_n_train": params.rpn_post_nms_top_n,
        "rpn_post_nms_top_n_test": params.rpn_post_nms_top_n,
    }
    pretrained = params.weights in ("coco", "imagenet")
    backbone_weights = BACKBONE_WEIGHTS[params.backbone] if imagenet else None
    if params.backbone == "resnet50_fpn_v2":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=backbone_weights, num_classes=num_classes, **options)
        if pretrained:  # as torchvision's builder given weights: the stem and layer1 stay as pretrained
            for name, parameter in model.backbone.body.named_parameters():
                parameter.requires_grad_(name.startswith(("layer2.", "layer3.", "layer4.")))
    else:
        norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
        if params.backbone == "mobilenet_v3_large_fpn":
            backbone = mobilenet_backbone(
                backbone_name="mobilenet_v3_large", weights=backbone_weights, fpn=True, norm_layer=norm_layer,
                trainable_layers=3 if pretrained else 6,
            )
        else:
            backbone = resnet_fpn_backbone(
                backbone_name=params.backbone.removesuffix("_fpn"), weights=backbone_weights, norm_layer=norm_layer,
                trainable_layers=3 if pretrained else 5,
            )
        model = MaskRCNN(backbone, num_classes=num_classes, **options)
    _set_anchors(model, params)
    _set_mask_head(model, params, num_classes)
    return model


def _download(get: Callable[[], T], what: str) -> T:
    """``get()``, whose download failures (URLError and other OSErrors) raise :class:`ResourceError`."""
    try:
        return get()
    except OSError as exc:
        raise ResourceError(
            f"{what} could not be downloaded ({type(exc).__name__}: {exc}); check the network, or set "
            f"{PARAM}: none (random init) or the path of a local weights file"
        ) from exc


def _set_anchors(model: nn.Module, params: MaskRCNNParams) -> None:
    """Anchors of every aspect ratio, one size per feature map where the backbone gives one map per size (the
    ResNet FPNs: 5), else every size on each map (MobileNetV3 FPN: 3); new RPN logits when the anchors per
    location change."""
    levels = len(model.backbone.fpn.inner_blocks) + 1  # + the max-pooled level
    sizes = params.anchor_sizes
    per_level = tuple((size,) for size in sizes) if levels == len(sizes) else (tuple(sizes),) * levels
    anchors = AnchorGenerator(sizes=per_level, aspect_ratios=(tuple(params.aspect_ratios),) * levels)
    model.rpn.anchor_generator = anchors
    per_location = anchors.num_anchors_per_location()[0]
    old = model.rpn.head
    if old.cls_logits.out_channels != per_location:
        head = RPNHead(old.cls_logits.in_channels, per_location, conv_depth=len(old.conv))
        head.conv.load_state_dict(old.conv.state_dict())  # keep the (possibly pretrained) shared convolutions
        model.rpn.head = head


def _set_mask_head(model: nn.Module, params: MaskRCNNParams, num_classes: int) -> None:
    """A mask head of ``params.mask_head_channels`` (its 4 convolutions and the predictor's upsampling) where
    that is not torchvision's 256; ResNet-50 FPN v2's keeps its BatchNorm."""
    width = params.mask_head_channels
    if width == COCO_MASK_HEAD:
        return
    norm_layer = nn.BatchNorm2d if params.backbone == "resnet50_fpn_v2" else None
    heads = model.roi_heads
    heads.mask_head = MaskRCNNHeads(model.backbone.out_channels, [width] * 4, 1, norm_layer=norm_layer)
    heads.mask_predictor = MaskPredictor(width, width, num_classes)


def _load_fitting(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, backbone: str) -> None:
    """Load a Mask R-CNN state dict into ``model``: only predictor tensors (:data:`HEADS`) may differ in shape
    (they stay random), and BatchNorm's ``num_batches_tracked`` may be missing (a frozen-BatchNorm file)."""
    own = model.state_dict()
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ParamsError(
            f"{PARAM}: {source} does not fit Mask R-CNN {backbone}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    reshaped = [k for k, v in state.items() if v.shape != own[k].shape]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped if not k.startswith(HEADS)]
    if wrong:
        raise ParamsError(f"{PARAM}: {source} does not fit Mask R-CNN {backbone}: {len(wrong)} shape mismatches {wrong[:3]}")
    if reshaped:
        log.info("%s: %d predictor tensors of another shape stay randomly initialised: %s", source, len(reshaped),
                 reshaped)
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)


# ---------------------------------------------------------------------------------------------------
# Data


def instance_target(masks: np.ndarray, category: int) -> dict[str, torch.Tensor]:
    """Boxes (xyxy, exclusive max), labels and masks of an N×H×W uint8 stack; empty masks are left out."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    present = rows.any(axis=1)
    rows, cols = rows[present], cols[present]
    height, width = masks.shape[1:]
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), width - cols[:, ::-1].argmax(1), height - rows[:, ::-1].argmax(1)], axis=1
    )
    return {
        "boxes": torch.from_numpy(boxes.astype(np.float32).reshape(-1, 4)),
        "labels": torch.full((len(boxes),), category, dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(masks[present])),
    }


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """A uint8 H×W grey image as the model's input: float32 3×H×W in [0, 1] (the model normalises)."""
    grey = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).div_(255.0)
    return grey.unsqueeze(0).repeat(3, 1, 1)


class InstanceDataset(AugmentedDataset):
    """Whole images (3×H×W in [0, 1], grey repeated; the model normalises) with their Mask R-CNN targets, straight
    from the ``decode`` stage's outputs.

    The images come from an :class:`~cellseg.data.ImageStore`; each instance keeps its own whole mask, decoded
    from ``instances.parquet`` (overlaps with other cells included: the label images have trimmed them), in
    label order. The instances' pixel indices are held in memory; the N×H×W mask stack is built per item. An
    unaugmented item (validation) also carries the image's label image as ``truth``, what ``evaluate`` scores
    against. The augmentation moves image and masks together (seeded as :class:`~cellseg.data.AugmentedDataset`
    says); an instance it moves out of the image is left out.
    """

    def __init__(
        self, store: ImageStore, decoded_dir: Path, image_ids: Sequence[str], augment: A.Compose | None = None
    ) -> None:
        path = Path(decoded_dir) / INSTANCES_TABLE
        cells = pd.read_parquet(path, columns=["image_id", "label", "row", "annotation"])
        by_image = dict(tuple(cells.sort_values(["image_id", "label"]).groupby("image_id", sort=False)))
        self.store = store
        self.image_ids = list(image_ids)
        self.categories: list[int] = []
        self._pixels: list[np.ndarray] = []  # every instance's flat pixel indices, concatenated
        self._areas: list[np.ndarray] = []
        for image_id in self.image_ids:
            cell_type = store.cell_type(image_id)
            if cell_type not in CELL_TYPES:  # fails now, not mid-training
                known = ", ".join(CELL_TYPES)
                raise DataError(f"{path}: image {image_id!r}: unknown cell type {cell_type!r}; expected one of {known}")
            if image_id not in by_image:
                raise DataError(f"{path}: no instances of image {image_id!r}")
            indices = instance_pixels(by_image[image_id], store.image(image_id).shape, path)
            self.categories.append(category_id(cell_type))
            self._pixels.append(np.concatenate(indices).astype(np.int32))
            self._areas.append(np.array([len(i) for i in indices], dtype=np.int64))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_ids)

    def masks(self, i: int) -> np.ndarray:
        """Item ``i``'s instances as an N×H×W uint8 stack (1 inside), in label order."""
        image, areas = self.store.image(self.image_ids[i]), self._areas[i]
        masks = np.zeros((len(areas), image.size), dtype=np.uint8)
        masks[np.repeat(np.arange(len(areas)), areas), self._pixels[i]] = 1
        return masks.reshape(len(areas), *image.shape)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[i]
        image, masks, extra = self.store.image(image_id), self.masks(i), {}
        if self.augment is None:
            extra["truth"] = self.store.labels(image_id)
        else:
            self._seed_worker()
            out = self.augment(image=image, masks=masks)
            image, masks = out["image"], np.asarray(out["masks"])
        target = instance_target(masks, self.categories[i])
        target = {**target, "image_id": image_id, "cell_type": self.store.cell_type(image_id), **extra}
        return image_tensor(image), target


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """(list of images, list of targets): detection models take lists of differently sized images."""
    return [image for image, _ in batch], [target for _, target in batch]


# ---------------------------------------------------------------------------------------------------
# Post-processing


def paste_windows(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The integer windows ``x0, y0, x1, y1`` (exclusive) outside which torchvision's pasted masks are zero.

    ``paste_masks_in_image`` pads each 28×28 mask by a pixel and grows its box by 30/28 about the centre before
    pasting; a pixel more on each side covers its rounding. Clipped to the image of ``shape`` (H, W).
    """
    scale = (MASK_SIZE + 2) / MASK_SIZE
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    size = np.array([shape[1], shape[0]])
    low = np.clip(np.floor(centre - half) - 1, 0, size)
    high = np.clip(np.ceil(centre + half) + 2, 0, size)
    return np.concatenate([low, high], axis=1).astype(np.int64).reshape(-1, 4)


def score_floor(model: nn.Module, post: MaskRCNNPostprocess) -> None:
    """Drop detections under every class's ``score_threshold`` in the model itself, before its mask head and
    full-size mask pasting (4× faster inference for a weak model on CPU); :func:`detection_instances` applies
    each class's own threshold."""
    model.roi_heads.score_thresh = min(by_category(post.score_threshold, 1.0)[1:])


def detections(output: Mapping[str, torch.Tensor]) -> Detections:
    """One image's Mask R-CNN output (``boxes``, ``labels``, ``scores``, ``masks`` N×1×H×W) as :class:`Detections`:
    only the masks' windows are read (16 ms for 800 cells on a 704×520 image, where whole-image masks took 1.6 s)."""
    classes = output["labels"].detach().cpu().long()
    scores = output["scores"].detach().cpu().float()
    if classes.numel() and (int(classes.min()) < 1 or int(classes.max()) > len(CELL_TYPES)):
        raise DataError(f"predicted category ids {classes.unique().tolist()} outside 1..{len(CELL_TYPES)}")
    order = torch.argsort(scores, descending=True, stable=True).numpy()
    soft = output["masks"].detach()[:, 0]
    if soft.is_cuda:  # quantise on the GPU: bytes, not floats, cross to the host
        soft = soft.mul(255).round_().to(torch.uint8)
    soft = soft.cpu().numpy()
    boxes = output["boxes"].detach().cpu().numpy().astype(np.float64)[order]
    windows = paste_windows(boxes, soft.shape[1:])
    masks = [_quantised(soft[k, y0:y1, x0:x1]) for k, (x0, y0, x1, y1) in zip(order, windows)]
    return Detections(soft.shape[1:], classes.numpy()[order], scores.numpy()[order], boxes, windows, masks)


def _quantised(probabilities: np.ndarray) -> np.ndarray:
    """Mask probabilities as uint8 ``round(255 × p)`` (already so when quantised on the GPU)."""
    if probabilities.dtype == np.uint8:
        return probabilities.copy()
    return np.rint(probabilities * 255).astype(np.uint8)


def detection_instances(found: Detections, post: MaskRCNNPostprocess) -> Instances:
    """Non-overlapping instances of one image's detections.

    Keeps detections scoring at least their class's ``score_threshold``, binarises their soft masks at their
    class's ``mask_threshold`` (to 1/255), gives shared pixels to the higher score, drops instances smaller than
    their class's ``min_size`` and labels the rest 1..n by decreasing score (:class:`~cellseg.instances.Instances`).
    """
    thresholds = np.array(by_category(post.score_threshold, math.inf), dtype=np.float64)
    cuts = 255 * np.array(by_category(post.mask_threshold, 1.0), dtype=np.float64)
    min_sizes = np.array(by_category(post.min_size, 0))
    keep = np.flatnonzero(found.scores >= thresholds[found.classes])
    classes, scores = found.classes[keep], found.scores[keep]
    crops = [found.masks[k] > cuts[c] for k, c in zip(keep, classes)]
    labels, kept = remove_overlaps(crops, scores, windows=found.windows[keep], shape=found.shape)
    sizes = np.bincount(labels.ravel(), minlength=len(kept) + 1)[1:]
    big = np.flatnonzero(sizes >= min_sizes[classes[kept]])
    lut = np.zeros(len(kept) + 1, dtype=np.uint16)
    lut[big + 1] = np.arange(1, len(big) + 1)
    kept = kept[big]
    classes = classes[kept].astype(np.int64)
    return Instances(lut[labels], classes, scores[kept].astype(np.float32), image_class=majority_class(classes))


def predict_instances(output: Mapping[str, torch.Tensor], post: MaskRCNNPostprocess) -> Instances:
    """One image's Mask R-CNN output → non-overlapping instances (:func:`detections`, :func:`detection_instances`)."""
    return detection_instances(detections(output), post)


# ---------------------------------------------------------------------------------------------------
# Training


class MaskRCNNTask:
    """How the shared trainer trains and validates Mask R-CNN (batches from :func:`collate`)."""

    name = "maskrcnn"
    monitor = "map"
    collate = val_collate = staticmethod(collate)

    def __init__(self, params: MaskRCNNParams, post: MaskRCNNPostprocess) -> None:
        self.post = post
        # R50-FPN v2: 3.6 kB per pixel measured at image_scale 1 (7.3 kB at 0.5, where fixed costs weigh more)
        self.train_bytes_per_pixel = 3000 * params.image_scale**2

    def train_step(
        self, model: nn.Module, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The summed loss plus each of torchvision's loss components."""
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [
            {k: v.to(device, non_blocking=True) for k, v in target.items() if isinstance(v, torch.Tensor)}
            for target in targets
        ]
        model.train()
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}

    def validate(
        self, model: nn.Module, loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]], device: torch.device
    ) -> dict[str, float]:
        """Competition mAP (``map``, ``map/<cell type>``), mean instances per image and inference images/s."""
        was_training = model.training
        model.eval()
        score_floor(model, self.post)
        cuda = device.type == "cuda"
        score = CompetitionScore()
        n_pred, n_images, seconds = 0, 0, 0.0
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                for images, targets in loader:
                    images = [image.to(device, non_blocking=True) for image in images]
                    if cuda:
                        torch.cuda.synchronize(device)
                    began = time.perf_counter()
                    outputs = model(images)
                    if cuda:
                        torch.cuda.synchronize(device)
                    seconds += time.perf_counter() - began
                    for output, target in zip(outputs, targets):
                        instances = predict_instances(output, self.post)
                        score.add(target["truth"], instances.labels, group=target["cell_type"])
                        n_pred += len(instances.scores)
                        n_images += 1
        finally:
            model.train(was_training)
        result = score.result()
        metrics = {"map": result["score"]}
        metrics.update({f"map/{k[len('score/'):]}": v for k, v in result.items() if k.startswith("score/")})
        metrics["n_pred"] = n_pred / n_images
        metrics["images_per_s"] = n_images / max(seconds, 1e-9)
        return metrics


class MaskRCNNPredictor:
    """A trained Mask R-CNN as a :class:`cellseg.inference.Predictor`: whole images → classed instances; with
    ``tta``, the detections of the image and its flips merged (:mod:`.maskrcnn_tta`, 4× the time).
    :meth:`outputs` and :meth:`instances` split :meth:`predict` in two, for the tune stage's search."""

    name = "maskrcnn"
    post_fields = ("mask_threshold", "score_threshold", "min_size")

    def __init__(
        self, model: nn.Module, params: MaskRCNNParams, post: MaskRCNNPostprocess, device: torch.device,
        tta: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        score_floor(self.model, post)
        self.params = params
        self.post = post
        self.device = device
        self.tta = tta

    def _detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda):
            outputs = self.model([image_tensor(image).to(self.device) for image in images])
            return [detections(output) for output in outputs]

    def outputs(self, image: np.ndarray) -> Detections:
        """The detections of one uint8 H×W image that score at least the lowest ``score_threshold`` given."""
        if self.tta:
            return tta_detections(lambda moved: self._detect([moved])[0], image)
        return self._detect([image])[0]

    @staticmethod
    def cell_types(found: Detections) -> set[str]:
        """The cell types whose post-processing values shape this image's instances: those of its detections."""
        return {CELL_TYPES[c - 1] for c in np.unique(found.classes)}

    def instances(self, found: Detections, post: MaskRCNNPostprocess) -> Instances:
        """The instances of one image's detections with the post-processing values ``post``."""
        return detection_instances(found, post)

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Instances of each uint8 H×W image, each cell with its predicted type."""
        found = [self.outputs(image) for image in images] if self.tta else self._detect(images)
        return [detection_instances(f, self.post) for f in found]
