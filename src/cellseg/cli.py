"""The ``cellseg`` command line, and the error boundary shared by the DVC stage scripts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cellseg.errors import CellsegError

log = logging.getLogger("cellseg")


def guarded(main: Callable[[], None]) -> int:
    """Run ``main`` with logging set up; print a :class:`CellsegError` as one line and return 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except CellsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def stage_args(description: str | None, **paths: str) -> argparse.Namespace:
    """Parse a DVC stage script's command line: ``--params`` (default ``params.yaml``) and one required
    path option per keyword, ``--<name>``, whose value is its help text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
    for name, help_text in paths.items():
        parser.add_argument(f"--{name}", type=Path, required=True, help=help_text)
    return parser.parse_args()


def _synth(args: argparse.Namespace) -> None:
    from cellseg.sources.synthetic import synthesize

    synthesize(args.out, n_images=args.images, seed=args.seed)


def _predict(args: argparse.Namespace) -> None:
    from cellseg.predict import predict_images
    from cellseg.train import pick_device

    predict_images(
        args.model, args.inputs, args.out, overwrite=args.overwrite, batch_size=args.batch_size,
        device=pick_device(args.device),
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``cellseg`` subcommand."""
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic data set in the Kaggle format (train.csv + train/)")
    synth.add_argument("--out", type=Path, required=True, help="directory to write (replaced atomically)")
    synth.add_argument("--images", type=int, default=24, help="number of images (606 ≈ the real data's scale)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed → same bytes")
    synth.set_defaults(run=_synth)
    predict = commands.add_parser("predict", help="segment new images with a trained checkpoint")
    predict.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    predict.add_argument("--model", type=Path, required=True, help="a checkpoint, e.g. models/maskrcnn/best.pt")
    predict.add_argument("--out", type=Path, required=True, help="output directory (labels/, predictions.json, submission.csv)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    predict.add_argument("--batch-size", type=int, default=4)
    predict.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    predict.set_defaults(run=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellseg`` console script."""
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
