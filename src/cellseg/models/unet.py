"""The U-Net: build it (random, ImageNet or local-file encoder weights) and predict class probabilities.

``weights`` (``unet.encoder_weights``): ``"none"`` → random init; ``"imagenet"`` → smp's own download;
any other string → a local ``torch.save`` file holding an encoder state dict (keys of ``model.encoder``,
3 input channels are adapted to ``in_channels`` as smp does for ImageNet weights), a full U-Net state
dict, or a dict with a ``"state_dict"`` / ``"model"`` entry holding one of those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from cellseg.data import IGNORE_INDEX
from cellseg.checkpoint import read_weights
from cellseg.errors import ParamsError, ResourceError
from cellseg.metrics import iou_dice

PARAM = "unet.encoder_weights"
BN_MOMENTUM = 0.1


def build_unet(
    *, encoder: str = "efficientnet-b0", weights: str = "none", in_channels: int = 3, classes: int = 3
) -> torch.nn.Module:
    """A ``smp.Unet`` with the given encoder weights (see the module docstring)."""
    if weights == "none":
        return _smp_unet(encoder, None, in_channels, classes)
    if weights == "imagenet":
        try:
            return _smp_unet(encoder, "imagenet", in_channels, classes)
        except OSError as exc:  # hub/URL download failures: HfHubHTTPError, LocalEntryNotFoundError, URLError
            raise ResourceError(
                f"ImageNet weights for encoder {encoder!r} could not be downloaded ({type(exc).__name__}); "
                f"check the network, or set {PARAM}: none (random init) or the path of a local weights file"
            ) from exc
    return _load_local(encoder, Path(weights), in_channels, classes)


def unet_predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax class probabilities (N, classes, H, W), in eval mode and inference mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model(images).softmax(dim=1)
    finally:
        model.train(was_training)


def _smp_unet(encoder: str, weights: str | None, in_channels: int, classes: int) -> torch.nn.Module:
    """``smp.Unet`` with PyTorch's BatchNorm momentum; an unknown encoder or weights name raises :class:`ParamsError`.

    The EfficientNet encoders carry TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): their running
    statistics need thousands of steps to leave their initial values, so a short training validates (in eval
    mode) far worse than it trains. PyTorch's default 0.1 is used instead.
    """
    try:
        model = smp.Unet(encoder, encoder_weights=weights, in_channels=in_channels, classes=classes)
    except KeyError as exc:
        detail = str(exc)[:200]
        raise ParamsError(f"unet.encoder: {encoder!r} with weights {weights!r} is not available: {detail}") from exc
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = BN_MOMENTUM
    return model


def _load_local(encoder: str, path: Path, in_channels: int, classes: int) -> torch.nn.Module:
    """A U-Net initialised from a local encoder or full-model state dict."""
    state = read_weights(path, PARAM, "'none', 'imagenet'")
    model = _smp_unet(encoder, None, in_channels, classes)
    if set(state) == set(model.state_dict()):
        _load_strict(model, state, path)
    elif set(state) == set(model.encoder.state_dict()):
        if not _shapes_fit(model.encoder, state):  # e.g. a 3-channel backbone for a 1-channel model
            model = _smp_unet(encoder, None, 3, classes)
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
    """How the shared trainer trains and validates the U-Net (classes: background, interior, boundary)."""

    name = "unet"
    monitor = "dice"
    # smp's EfficientNet encoders keep their classifier's last convolution and BatchNorm (encoder._conv_head,
    # encoder._bn1), which the U-Net never uses: DistributedDataParallel must look for unused parameters, or
    # it fails at the second step.
    find_unused_parameters = True

    def __init__(self, loss: str = "ce_dice", channels_last: bool = False) -> None:
        if loss not in LOSSES:
            raise ParamsError(f"unet.loss: {loss!r} is not one of {', '.join(LOSSES)}")
        self.loss = loss
        self.channels_last = channels_last
        self.dice_loss = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)

    def _forward(self, model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        channels_last = self.channels_last and device.type == "cuda"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return model(images), batch["target"].to(device, non_blocking=True)

    def _losses(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        if self.loss == "ce":
            return {"loss": ce}
        dice = self.dice_loss(logits.float(), target)
        return {"loss": ce + dice, "ce": ce, "dice_loss": dice}

    def train_step(self, model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss of one batch plus the batch's foreground IoU and Dice (the seed's training curves)."""
        logits, target = self._forward(model, batch, device)
        stats = self._losses(logits, target)
        with torch.no_grad():
            inter, pred, true = _foreground_counts(logits, target)
            iou, dice = iou_dice(inter, pred, true)
        return {**stats, "iou": torch.tensor(iou), "dice": torch.tensor(dice)}

    def validate(self, model: torch.nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, float]:
        """Loss and foreground pixel IoU/Dice over whole validation images, overall and per cell type."""
        model.eval()
        counts: dict[str, np.ndarray] = {}
        loss_sum, n_images = 0.0, 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for batch in loader:
                logits, target = self._forward(model, batch, device)
                loss_sum += float(self._losses(logits, target)["loss"]) * len(target)
                n_images += len(target)
                for k, cell_type in enumerate(batch["cell_type"]):
                    found = np.array(_foreground_counts(logits[k : k + 1], target[k : k + 1]), dtype=np.int64)
                    for group in ("all", cell_type):
                        counts[group] = counts.get(group, 0) + found
        model.train()
        metrics = {"loss": loss_sum / max(n_images, 1)}
        for group, (inter, pred, true) in sorted(counts.items()):
            iou, dice = iou_dice(int(inter), int(pred), int(true))
            suffix = "" if group == "all" else f"/{group}"
            metrics[f"iou{suffix}"], metrics[f"dice{suffix}"] = iou, dice
        return metrics


LOSSES = ("ce", "ce_dice")


def _foreground_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """Pixel counts (intersection, predicted, true) of the foreground (interior or boundary), ignoring padding."""
    valid = target != IGNORE_INDEX
    pred = (logits.argmax(dim=1) != 0) & valid
    true = (target != 0) & valid
    return int((pred & true).sum()), int(pred.sum()), int(true.sum())
