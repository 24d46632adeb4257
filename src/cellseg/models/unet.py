"""The U-Net: build it (random, ImageNet or local-file encoder weights) and predict class probabilities.

``weights`` (``unet.encoder_weights``): ``"none"`` → random init; ``"imagenet"`` → smp's own download;
any other string → a local ``torch.save`` file holding an encoder state dict (keys of ``model.encoder``,
3 input channels are adapted to ``in_channels`` as smp does for ImageNet weights), a full U-Net state
dict, or a dict with a ``"state_dict"`` / ``"model"`` entry holding one of those.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from cellseg.errors import ParamsError, ResourceError

PARAM = "unet.encoder_weights"
CHECKPOINT_ENTRIES = ("state_dict", "model")
# What torch.load(weights_only=True) raises on a file that is not a (complete) torch checkpoint.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError)


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
    """``smp.Unet``; an unknown encoder or weights name raises :class:`ParamsError`."""
    try:
        return smp.Unet(encoder, encoder_weights=weights, in_channels=in_channels, classes=classes)
    except KeyError as exc:
        detail = str(exc)[:200]
        raise ParamsError(f"unet.encoder: {encoder!r} with weights {weights!r} is not available: {detail}") from exc


def _load_local(encoder: str, path: Path, in_channels: int, classes: int) -> torch.nn.Module:
    """A U-Net initialised from a local encoder or full-model state dict."""
    state = _read_state_dict(path)
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file; anything else raises :class:`ParamsError` naming the file."""
    if not path.is_file():
        raise ParamsError(f"{PARAM}: {str(path)!r} is neither 'none', 'imagenet' nor an existing weights file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise ParamsError(f"{PARAM}: {path} is not a readable torch checkpoint ({type(exc).__name__})") from exc
    if isinstance(checkpoint, Mapping):
        entry = next((checkpoint[k] for k in CHECKPOINT_ENTRIES if isinstance(checkpoint.get(k), Mapping)), None)
        checkpoint = checkpoint if entry is None else entry
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ParamsError(f"{PARAM}: {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(checkpoint)


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
