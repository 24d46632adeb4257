"""File input/output: atomic writes and strict image reading."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cellseg.errors import DataError, cut


MARKER = ".cellseg-output"
MARKER_TEXT = "Written by cellseg, which may replace this folder as a whole (delete this file to keep it from that).\n"


def replaceable(folder: Path) -> bool:
    """Whether cellseg may replace ``folder`` as a whole: it is absent, empty, or holds cellseg's :data:`MARKER`."""
    return not folder.is_dir() or (folder / MARKER).is_file() or not any(folder.iterdir())


def refuse_to_replace(target: Path, name: str, *, folder: bool) -> None:
    """Raise :class:`DataError` (naming the output ``name``) unless an output may be written at ``target``: a
    folder (replaced as a whole) onto no file and only onto a :func:`replaceable` folder, a file onto no folder."""
    if not folder:
        if target.is_dir() and not target.is_symlink():
            raise DataError(f"{name}: is a folder; this output is a file")
        return
    if target.exists() and not target.is_dir():
        raise DataError(f"{name}: is a file; this output is a folder")
    if not replaceable(target):
        raise DataError(
            f"{name}: a folder that cellseg did not write (no {MARKER} file in it): refusing to replace it; "
            "choose a new or empty folder"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it.

    The previous content of ``path`` stays intact until the new one is complete. A directory is written with
    cellseg's :data:`MARKER` in it, and only a folder that is :func:`replaceable` is replaced (through a link,
    its target). Debris of a killed run (its temporary path, a previous output set aside) is cleared first.
    """
    final = Path(path)
    if directory and final.is_symlink():
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_debris(final)
    refuse_to_replace(final, str(path), folder=directory)
    prefix = f".{final.name}.{os.getpid()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=final.parent))
        (tmp / MARKER).write_text(MARKER_TEXT)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        old = _set_aside(final)
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _set_aside(final: Path) -> Path:
    """Where a directory output is moved while its replacement is renamed in."""
    return final.with_name(f".{final.name}.old")


def _clear_debris(final: Path) -> None:
    """Remove what a killed writer of ``final`` left beside it: temporary paths of processes that are gone, and
    the set-aside previous output (put back in place when the kill came between the two renames)."""
    prefix = f".{final.name}."
    for entry in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = entry.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            _remove(entry)
    old = _set_aside(final)
    if old.is_dir() and not old.is_symlink():
        if final.exists():
            _remove(old)
        else:
            old.rename(final)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextlib.contextmanager
def opened_image(
    path: str | os.PathLike[str], opener: Callable[[Path], Any] = Image.open, errors: tuple[type, ...] = ()
) -> Iterator[Any]:
    """The image file opened with ``opener`` (PIL by default: header read, pixels not yet); a clear
    :class:`DataError` names the file when it is missing, empty or not a readable image (a decompression bomb
    included; ``errors``: the opener's own exception types besides :data:`READ_ERRORS`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty")
    try:
        with opener(path) as image:
            yield image
    except DataError:
        raise
    except (*READ_ERRORS, *errors) as exc:
        raise DataError(f"{path}: not a readable image ({cut(' '.join(str(exc).split()), 160)})") from None


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an 8-bit image as a uint8 H×W array; a clear :class:`DataError` names the file otherwise.

    Grey with alpha and RGB images whose three channels are equal are converted; anything else
    (16-bit, colour, palette with colours) is refused rather than silently altered.
    """
    with opened_image(path) as image:
        image.load()
        mode = image.mode
        array = np.asarray(image)
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
