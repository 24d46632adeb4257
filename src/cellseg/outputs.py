"""Where a run may write: its output paths, checked against its inputs before any work.

An output is one of three kinds:

* ``FILE``: one file, replaced atomically (``split.json``, a report);
* ``FOLDER``: a folder that named files are written into (``models/unet``), created when absent;
* ``TREE``: a folder replaced as a whole (the decoded data set, ``cellseg predict --out``). It must be absent,
  empty, or one that cellseg wrote: every tree holds the marker file :data:`cellseg.io.MARKER`
  (:func:`cellseg.io.refuse_to_replace`, which the atomic write checks again).

Every output, judged by the path a link points to: is not the working directory nor one of its parents; does
not equal, contain or lie inside an input (or another output, unless both are folders); is a file where a file
is written and a folder where a folder is, and not under a file.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path

from cellseg.errors import DataError
from cellseg.io import refuse_to_replace


class Kind(enum.Enum):
    FILE = "file"
    FOLDER = "folder"
    TREE = "tree"


def _relation(a: Path, b: Path) -> str | None:
    """How resolved path ``a`` stands to resolved path ``b``: "is", "contains", "lies inside", or None."""
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def _named(path: Path) -> str:
    """``path`` as the user gave it, with its target when it is a link."""
    return f"{path} (a link to {path.resolve()})" if path.is_symlink() else str(path)


def check_outputs(
    outputs: Sequence[tuple[Path, Kind]], inputs: Sequence[Path], *, overwrite: bool = True
) -> None:
    """Raise :class:`DataError` in one line, naming the path, when an output breaks a rule of the module
    docstring. ``overwrite=False`` (a command without ``--overwrite``) also refuses a non-empty tree."""
    cwd = Path.cwd().resolve()
    sources = [(Path(p), Path(p).resolve()) for p in inputs]
    targets = [(Path(p), Path(p).resolve(), kind) for p, kind in outputs]
    for number, (path, target, kind) in enumerate(targets):
        name = _named(path)
        if target == cwd or target in cwd.parents:
            where = "the working directory" if target == cwd else "a parent of the working directory"
            raise DataError(f"{name}: is {where}; an output needs a path of its own")
        for given, source in sources:
            if relation := _relation(target, source):
                raise DataError(f"{name}: an output may not be, contain or lie inside an input; it {relation} the input {given}")
        for other, other_target, other_kind in targets[number + 1 :]:
            relation = _relation(target, other_target)
            if relation and not (kind is Kind.FOLDER and other_kind is Kind.FOLDER):
                raise DataError(f"{name}: two outputs overlap; it {relation} the output {other}")
        existing = next(parent for parent in target.parents if parent.exists())
        if not existing.is_dir():
            raise DataError(f"{name}: lies under {existing}, which is a file, not a folder")
        if kind is Kind.FILE:
            refuse_to_replace(target, name, folder=False)
            if target.exists() and not target.is_file():
                raise DataError(f"{name}: is not a regular file; this output is a file")
            continue
        if kind is Kind.FOLDER and target.exists() and not target.is_dir():
            raise DataError(f"{name}: is a file; this output is a folder")
        if kind is Kind.TREE:
            refuse_to_replace(target, name, folder=True)
        if kind is Kind.TREE and not overwrite and target.is_dir() and any(target.iterdir()):
            raise DataError(f"{name}: already exists and is not empty; pass --overwrite to replace it")
