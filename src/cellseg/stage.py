"""What every DVC stage script and the ``cellseg`` command share: the error boundary (one line per error), and
the command line of a stage script, whose output paths are checked before any work."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cellseg import config
from cellseg.errors import CellsegError
from cellseg.outputs import Kind, check_outputs


def guarded(main: Callable[[], None]) -> int:
    """Run ``main`` with logging set up; print a :class:`CellsegError`, or an ``OSError`` (a full disk, no
    permission), as one line and return 1 (atomic outputs have removed their temporary paths by then)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except CellsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # what the machine refuses: a full disk, a read-only or vanished folder, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


@dataclass(frozen=True)
class In:
    """A stage script's input path option (``many``: one or more paths)."""

    help: str
    many: bool = False


@dataclass(frozen=True)
class Out:
    """A stage script's output path option, of the :class:`~cellseg.outputs.Kind` ``kind``."""

    kind: Kind
    help: str


def stage_args(description: str | None, *, data_root: bool = True, **paths: In | Out) -> argparse.Namespace:
    """Parse a DVC stage script's command line: ``--params`` (default ``params.yaml``) and one required path
    option per keyword, ``--<name>``; then check the outputs (:func:`~cellseg.outputs.check_outputs`) against
    the inputs, the params file and, with ``data_root``, the params' ``data.root``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
    for name, spec in paths.items():
        many = isinstance(spec, In) and spec.many
        parser.add_argument(f"--{name}", type=Path, required=True, nargs="+" if many else None, help=spec.help)
    args = parser.parse_args()
    inputs = [args.params]
    for name, spec in paths.items():
        if isinstance(spec, In):
            inputs += getattr(args, name) if spec.many else [getattr(args, name)]
    if data_root and (root := config.data_root(config.read_params(args.params))):
        inputs.append(root)
    check_outputs([(getattr(args, name), spec.kind) for name, spec in paths.items() if isinstance(spec, Out)], inputs)
    return args
