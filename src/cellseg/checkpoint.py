"""Checkpoints: one format for every model, saved atomically, loaded only with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cellseg.errors import DataError
from cellseg.io import atomic_path

FORMAT = "cellseg-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike[str], model_name: str, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts only) as a checkpoint of ``model_name``."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, "model": model_name, **state}, tmp)


def load_checkpoint(path: str | os.PathLike[str], model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs from the file); a foreign, truncated or wrong-model file raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a readable cellseg checkpoint (truncated, corrupt or unsafe: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a cellseg checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint format version {state.get('version')!r}; this cellseg reads {VERSION}")
    if model_name is not None and state.get("model") != model_name:
        raise DataError(f"{path}: checkpoint of model {state.get('model')!r}, expected {model_name!r}")
    return state
