"""File input/output: atomic writes and strict image reading."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cellseg.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it.

    The previous content of ``path`` (file or directory) stays intact until the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        _remove(old)
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (a NaN or infinite float becomes ``null``), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def write_parquet(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """Write a table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an 8-bit image as a uint8 H×W array; a clear :class:`DataError` names the file otherwise.

    Grey with alpha and RGB images whose three channels are equal are converted; anything else
    (16-bit, colour, palette with colours) is refused rather than silently altered.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if mode == "L":
        return array
    if mode == "LA":
        return array[..., 0]
    if mode in ("RGB", "RGBA") and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(
        array[..., 0], array[..., 2]
    ):
        return np.ascontiguousarray(array[..., 0])
    raise DataError(f"{path}: expected an 8-bit greyscale image, got PIL mode {mode!r} (dtype {array.dtype})")


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 or uint16 H×W array as a PNG (not atomic: use inside an atomic directory)."""
    if array.dtype not in (np.uint8, np.uint16) or array.ndim != 2:
        raise ValueError(f"write_png takes a 2-D uint8/uint16 array, got {array.dtype} {array.shape}")
    Image.fromarray(array).save(path, compress_level=1)


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a uint16 instance label PNG written by :func:`write_png`."""
    with Image.open(path) as image:
        return np.asarray(image).astype(np.uint16, copy=False)
