"""The U-Net: build it (random, ImageNet or local-file encoder weights), train it, turn its outputs into cells.

The network has two outputs: three per-pixel maps (class logits of background, interior and boundary, or
cellpose's flows and cell probability: ``unet.target``, :mod:`.unet_targets`) and, from a classification head
on the encoder's deepest features (smp's ``aux_params``), the image's cell type, so that inference never needs
the true type (the per-type minimum sizes use the predicted one).

``weights`` (``unet.encoder_weights``): ``"none"`` → random init; ``"imagenet"`` → smp's own download;
any other string → a local ``torch.save`` file holding an encoder state dict (keys of ``model.encoder``,
3 input channels are adapted to ``in_channels`` as smp does for ImageNet weights), a full U-Net state
dict, or a dict with a ``"state_dict"`` / ``"model"`` entry holding one of those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from cellseg.checkpoint import read_weights
from cellseg.config import UNetParams, UNetPostprocess
from cellseg.data import N_CLASSES, WholeImageDataset, padded_input
from cellseg.errors import ParamsError, ResourceError
from cellseg.instances import Instances
from cellseg.metrics import CompetitionScore, iou_dice
from cellseg.celltypes import CELL_TYPES, category_id
from cellseg.flows import SYMMETRIES
from cellseg.models.unet_targets import unet_target
from cellseg.postprocess import Memo

PARAM = "unet.encoder_weights"
BN_MOMENTUM = 0.1
TYPE_HEAD_DROPOUT = 0.2


def build_unet(params: UNetParams) -> torch.nn.Module:
    """A ``smp.Unet`` with the encoder, weights (see the module docstring), input channels and decoder widths of
    ``params``, and a cell-type head.

    Called on a batch it returns ``(output logits N×3×H×W, cell-type logits N×len(CELL_TYPES))``.
    """
    shape = (params.encoder, params.channels, params.decoder_channels)
    if params.encoder_weights == "none":
        return _smp_unet(*shape, None)
    if params.encoder_weights == "imagenet":
        try:
            return _smp_unet(*shape, "imagenet")
        except OSError as exc:  # hub/URL download failures: HfHubHTTPError, LocalEntryNotFoundError, URLError
            raise ResourceError(
                f"ImageNet weights for encoder {params.encoder!r} could not be downloaded ({type(exc).__name__}); "
                f"check the network, or set {PARAM}: none (random init) or the path of a local weights file"
            ) from exc
    return _load_local(*shape, Path(params.encoder_weights))


def architecture(params: UNetParams) -> torch.nn.Module:
    """The U-Net ``params`` describe, randomly initialised: a checkpoint's weights go in it."""
    return build_unet(params.model_copy(update={"encoder_weights": "none"}))


def _smp_unet(
    encoder: str, in_channels: int, decoder_channels: Sequence[int], weights: str | None
) -> torch.nn.Module:
    """``smp.Unet`` with PyTorch's BatchNorm momentum; an unknown encoder or weights name raises :class:`ParamsError`.

    The EfficientNet encoders carry TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): their running
    statistics need thousands of steps to leave their initial values, so a short training validates (in eval
    mode) far worse than it trains. PyTorch's default 0.1 is used instead.
    """
    head = {"classes": len(CELL_TYPES), "dropout": TYPE_HEAD_DROPOUT}
    try:
        model = smp.Unet(
            encoder, encoder_weights=weights, in_channels=in_channels, classes=N_CLASSES,
            decoder_channels=tuple(decoder_channels), aux_params=head,
        )
    except KeyError as exc:
        detail = str(exc)[:200]
        raise ParamsError(f"unet.encoder: {encoder!r} with weights {weights!r} is not available: {detail}") from exc
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = BN_MOMENTUM
    return model


def _load_local(encoder: str, in_channels: int, decoder_channels: Sequence[int], path: Path) -> torch.nn.Module:
    """A U-Net initialised from a local encoder or full-model state dict."""
    state = read_weights(path, PARAM, "'none', 'imagenet'")
    model = _smp_unet(encoder, in_channels, decoder_channels, None)
    if set(state) == set(model.state_dict()):
        _load_strict(model, state, path)
    elif set(state) == set(model.encoder.state_dict()):
        if not _shapes_fit(model.encoder, state):  # e.g. a 3-channel backbone for a 1-channel model
            model = _smp_unet(encoder, 3, decoder_channels, None)
            _load_strict(model.encoder, state, path)
            model.encoder.set_in_channels(in_channels, pretrained=True)
        else:
            _load_strict(model.encoder, state, path)
    else:
        raise ParamsError(f"{PARAM}: {path} does not fit a U-Net with encoder {encoder!r}: {_key_diff(model, state)}")
    return model


def _shapes_fit(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``state`` has the shape of the module's own tensor of that name."""
    own = module.state_dict()
    return all(own[k].shape == v.shape for k, v in state.items())


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)``; a shape mismatch raises :class:`ParamsError`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ParamsError(f"{PARAM}: {path} does not fit the U-Net: {detail}") from exc


def _key_diff(model: torch.nn.Module, state: Mapping[str, torch.Tensor], shown: int = 3) -> str:
    """Missing/unexpected keys against the closer of the encoder's and the whole model's keys."""
    candidates = (set(model.encoder.state_dict()), set(model.state_dict()))
    expected = max(candidates, key=lambda keys: len(keys & set(state)))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    return f"{len(missing)} missing keys {missing[:shown]}, {len(unexpected)} unexpected keys {unexpected[:shown]}"


class UNetTask:
    """How the shared trainer trains and validates the U-Net: its pixel target (:mod:`.unet_targets`) plus the
    image's cell type from the classification head."""

    name = "unet"
    monitor = "map"
    train_bytes_per_pixel = 2500  # EfficientNet-B0, decoder 128..16: 2.6-3.3 kB measured (batch 4-16, 128-256 px)
    # smp's EfficientNet encoders keep their classifier's last convolution and BatchNorm (encoder._conv_head,
    # encoder._bn1), which the U-Net never uses: DistributedDataParallel must look for unused parameters, or
    # it fails at the second step.
    find_unused_parameters = True
    collate, val_collate = None, staticmethod(WholeImageDataset.collate)

    def __init__(self, params: UNetParams, post: UNetPostprocess, channels_last: bool) -> None:
        self.params, self.post = params, post
        self.target = unet_target(params)
        self.channels_last = channels_last

    def _forward(self, model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Output maps' logits, cell-type logits, and the batch's pixel targets, valid pixels and cell types,
        on ``device``."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        logits, type_logits = model(images)
        target = batch["target"].to(device, non_blocking=True)
        valid = batch["valid"].to(device) if "valid" in batch else torch.ones_like(logits[:, 0], dtype=torch.bool)
        return logits, type_logits, target, valid, batch["type"].to(device)

    def _losses(
        self, logits: torch.Tensor, type_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
        types: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        pixels = self.target.losses(logits, target, valid)
        type_ce = F.cross_entropy(type_logits.float(), types)
        loss = sum(pixels.values()) + self.params.type_loss_weight * type_ce
        return {"loss": loss, **pixels, "type_ce": type_ce}

    def _counts(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[int, int, int]:
        """Foreground pixel counts (intersection, predicted, true) over the valid pixels."""
        pred = self.target.foreground(logits) & valid
        true = self.target.true_foreground(target) & valid
        return int((pred & true).sum()), int(pred.sum()), int(true.sum())

    def train_step(self, model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss of one batch plus the batch's foreground IoU and Dice (the seed's training curves) and the share
        of windows whose cell type the head names."""
        logits, type_logits, target, valid, types = self._forward(model, batch, device)
        stats = self._losses(logits, type_logits, target, valid, types)
        with torch.no_grad():
            iou, dice = iou_dice(*self._counts(logits, target, valid))
            type_accuracy = (type_logits.argmax(dim=1) == types).float().mean()
        return {**stats, "iou": torch.tensor(iou), "dice": torch.tensor(dice), "type_accuracy": type_accuracy}

    def validate(self, model: torch.nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, float]:
        """Over whole validation images, overall and per (true) cell type: loss, foreground pixel IoU/Dice, the
        competition mAP of the instances (post-processed with the predicted cell type) and the share of images
        whose cell type the head names (``type_accuracy``)."""
        model.eval()
        counts: dict[str, np.ndarray] = {}
        typed: dict[str, np.ndarray] = {}
        score = CompetitionScore()
        loss_sum, n_images = 0.0, 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for batch in loader:
                logits, type_logits, target, valid, types = self._forward(model, batch, device)
                loss_sum += float(self._losses(logits, type_logits, target, valid, types)["loss"]) * len(target)
                n_images += len(target)
                maps = self.target.maps(logits).cpu().numpy()
                predicted = type_logits.argmax(dim=1).cpu().numpy()
                for k, cell_type in enumerate(batch["cell_type"]):
                    height, width = int(batch["height"][k]), int(batch["width"][k])
                    one = slice(k, k + 1)
                    found = np.array(self._counts(logits[one], target[one], valid[one]), dtype=np.int64)
                    right = np.array([predicted[k] == int(types[k]), 1], dtype=np.int64)
                    for group in ("all", cell_type):
                        counts[group] = counts.get(group, 0) + found
                        typed[group] = typed.get(group, 0) + right
                    labels = self.target.instances(maps[k, :, :height, :width], self.post, CELL_TYPES[predicted[k]])
                    score.add(batch["labels"][k, :height, :width].numpy(), labels, group=cell_type)
        model.train()
        metrics = {"loss": loss_sum / max(n_images, 1)}
        competition = score.result()
        for group, (inter, pred, true) in sorted(counts.items()):
            iou, dice = iou_dice(int(inter), int(pred), int(true))
            suffix = "" if group == "all" else f"/{group}"
            metrics[f"iou{suffix}"], metrics[f"dice{suffix}"] = iou, dice
            metrics[f"map{suffix}"] = float(competition[f"score{suffix}"])
            metrics[f"type_accuracy{suffix}"] = float(typed[group][0] / typed[group][1])
        return metrics


@dataclass(frozen=True)
class UNetOutputs:
    """The network's outputs for one whole image, before post-processing: the target's (3, H, W) ``maps``, the
    cell-type probabilities (one per ``CELL_TYPES``) and a ``memo`` of post-processing steps already taken."""

    maps: np.ndarray
    type_probs: np.ndarray
    memo: Memo = field(default_factory=dict, repr=False)

    @property
    def cell_type(self) -> str:
        """The image's predicted cell type."""
        return CELL_TYPES[int(self.type_probs.argmax())]


class UNetPredictor:
    """U-Net outputs → instances (:mod:`.unet_targets`), all of the image's predicted cell type.

    With ``tta``, the outputs are averaged over the 8 symmetries of the pixel grid (flips and quarter turns):
    each one's maps are moved back, their flow vectors turned back, before the mean (8× the network's time).
    :meth:`outputs` and :meth:`instances` split :meth:`predict` in two, for the tune stage's search.
    """

    name = "unet"

    def __init__(
        self, model: torch.nn.Module, params: UNetParams, post: UNetPostprocess, device: torch.device,
        tta: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.params = params
        self.post = post
        self.target = unet_target(params)
        self.post_fields = self.target.post_fields
        self.device = device
        self.symmetries = SYMMETRIES if tta else SYMMETRIES[:1]

    def outputs(self, image: np.ndarray) -> UNetOutputs:
        """The outputs of one whole image, averaged over the predictor's symmetries."""
        maps, types = 0.0, 0.0
        for symmetry in self.symmetries:
            moved, type_probs = self._maps(symmetry.apply(image))
            maps = maps + symmetry.inverse().apply(moved, vectors=self.target.vectors)
            types = types + type_probs
        return UNetOutputs(maps / len(self.symmetries), types / len(self.symmetries))

    @torch.inference_mode()
    def _maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The maps and cell-type probabilities of one image as it is (padded to a multiple of 32 for the network)."""
        height, width = image.shape
        tensor, _ = padded_input(image, self.params.mean, self.params.std, self.params.channels)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits, type_logits = self.model(tensor.unsqueeze(0).to(self.device))
        maps = self.target.maps(logits)[0, :, :height, :width].cpu().numpy()
        return maps, type_logits.float().softmax(dim=1)[0].cpu().numpy()

    @staticmethod
    def cell_types(outputs: UNetOutputs) -> set[str]:
        """The cell types whose post-processing values shape this image's instances: its predicted one."""
        return {outputs.cell_type}

    def instances(self, outputs: UNetOutputs, post: UNetPostprocess) -> Instances:
        """The instances of one image's outputs with the post-processing values ``post``; each instance's score
        is its mean per-pixel confidence."""
        labels = self.target.instances(outputs.maps, post, outputs.cell_type, outputs.memo)
        n = int(labels.max())
        confidence = self.target.confidence(outputs.maps).ravel()
        sums = np.bincount(labels.ravel(), weights=confidence, minlength=n + 1)[1:]
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        category = category_id(outputs.cell_type)
        classes = np.full(n, category, dtype=np.int64)
        return Instances(labels, classes, (sums / np.maximum(sizes, 1)).astype(np.float32), image_class=category)

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        return [self.instances(self.outputs(image), self.post) for image in images]
