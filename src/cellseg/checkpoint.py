"""Checkpoints: one format for every model, saved atomically with a content hash, loaded only with
``weights_only=True`` and verified against that hash."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cellseg.errors import DataError, ParamsError
from cellseg.io import atomic_path

FORMAT = "cellseg-checkpoint"
VERSION = 4  # 2: with the content hash; 3: post-processing params in their own entry; 4: the U-Net's target
HASH = "sha256"
# What torch.load(weights_only=True) raises on a file that is not a (complete, safe) torch checkpoint.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError)
# Where a weights file may nest its state dict (a cellseg checkpoint keeps it under "model_state").
WEIGHT_ENTRIES = ("model_state", "state_dict", "model")


def save_checkpoint(path: str | os.PathLike[str], model_name: str, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts only) as a checkpoint of ``model_name``."""
    content = {"format": FORMAT, "version": VERSION, "model": model_name, **state}
    with atomic_path(path) as tmp:
        torch.save({**content, HASH: content_hash(content)}, tmp)


def content_hash(content: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: every tensor's bytes, dtype and shape, and every other value's repr,
    each with its place in the nested dicts and lists."""
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{where}={tensor.dtype}{tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{where}/{key!r}")
        elif isinstance(value, (list, tuple)):
            for number, item in enumerate(value):
                walk(item, f"{where}[{number}]")
        else:
            digest.update(f"{where}={value!r};".encode())

    walk(content, "")
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike[str], model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs from the file) and verify its content hash; a foreign, truncated,
    corrupt or wrong-model file raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a readable cellseg checkpoint (truncated, corrupt or unsafe: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a cellseg checkpoint (no '{FORMAT}' marker)")
    return _verified(state, path, model_name)


def _verified(state: dict[str, Any], path: Path, model_name: str | None) -> dict[str, Any]:
    """A loaded cellseg checkpoint ``state`` without its hash, once its version, hash and model are checked."""
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint format version {state.get('version')!r}; this cellseg reads {VERSION}")
    stored = state.pop(HASH, None)
    if stored != content_hash(state):
        raise DataError(f"{path}: checkpoint is corrupt: its content does not match the {HASH} hash saved with it")
    if model_name is not None and state.get("model") != model_name:
        raise DataError(f"{path}: checkpoint of model {state.get('model')!r}, expected {model_name!r}")
    return state


def read_weights(path: Path, param: str, choices: str) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file named by the param ``param`` (a bare state dict or one nested
    under :data:`WEIGHT_ENTRIES`); anything else raises :class:`ParamsError` naming the param and the file.

    ``choices`` lists the param's other accepted values, for the message when the file does not exist.
    """
    if not path.is_file():
        raise ParamsError(f"{param}: {str(path)!r} is neither {choices} nor an existing weights file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise ParamsError(f"{param}: {path} is not a readable torch checkpoint ({type(exc).__name__})") from exc
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        try:
            checkpoint = _verified(checkpoint, path, None)  # a cellseg checkpoint: its content hash is verified
        except DataError as exc:
            raise ParamsError(f"{param}: {exc}") from None
    if isinstance(checkpoint, Mapping):
        entry = next((checkpoint[k] for k in WEIGHT_ENTRIES if isinstance(checkpoint.get(k), Mapping)), None)
        checkpoint = checkpoint if entry is None else entry
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ParamsError(f"{param}: {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(checkpoint)
