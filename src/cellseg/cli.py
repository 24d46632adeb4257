"""The ``cellseg`` command line (``synth``, ``predict``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cellseg.outputs import Kind, check_outputs
from cellseg.stage import guarded
from cellseg.exports import OUTPUTS
from cellseg.tiling import MAX_OVERLAP


def _synth(args: argparse.Namespace) -> None:
    from cellseg.sources.synthetic import synthesize

    check_outputs([(args.out, Kind.TREE)], [], overwrite=args.overwrite)
    synthesize(args.out, n_images=args.images, seed=args.seed)


def _predict(args: argparse.Namespace) -> None:
    from cellseg.predict import predict_images
    from cellseg.devices import pick_device

    predict_images(
        args.model, args.inputs, args.out, overwrite=args.overwrite, batch_size=args.batch_size,
        device=pick_device(args.device), tta=args.tta, postprocess=args.postprocess, scale=args.scale,
        overlap=args.tile_overlap, outputs=[name for name in OUTPUTS if getattr(args, name)],
        skip_bad=args.skip_bad,
    )


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound: None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is above {high}")
        return value

    return parse


def _scale(text: str) -> float:
    """An argparse type: a resizing factor from 0.1 to 10."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{value} is outside 0.1..10")
    return value


def _device(text: str) -> str:
    """An argparse type: a device this machine has (:func:`cellseg.devices.check_device`)."""
    from cellseg.devices import check_device

    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``cellseg`` subcommand."""
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic data set in the Kaggle format (train.csv + train/)")
    synth.add_argument("--out", type=Path, required=True, help="directory to write (replaced atomically)")
    synth.add_argument("--overwrite", action="store_true", help="replace --out if cellseg wrote it and it is not empty")
    synth.add_argument("--images", type=_integer(1), default=24, help="number of images (606 ≈ the real data's scale)")
    synth.add_argument("--seed", type=_integer(0, 2**32 - 1), default=0, help="random seed; same seed → same bytes")
    synth.set_defaults(run=_synth)
    predict = commands.add_parser("predict", help="segment new images with a trained checkpoint")
    predict.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    predict.add_argument("--model", type=Path, required=True, help="a checkpoint, e.g. models/maskrcnn/best.pt")
    predict.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if cellseg wrote it and it is not empty")
    predict.add_argument("--batch-size", type=_integer(1), default=4, help="704x520 tiles per forward pass")
    predict.add_argument(
        "--device", type=_device, default="auto", help="auto (CUDA when present), or cpu, cuda, cuda:1 ... if present"
    )
    predict.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=None,
        help="test-time augmentation: the U-Net's outputs averaged over the 8 flips and quarter turns (8× slower); "
        "Mask R-CNN's detections of the image and its 3 flips fused (4× slower). Default: as the tuned "
        "post-processing file was searched (the tune stage follows evaluate.tta), off without one",
    )
    predict.add_argument(
        "--postprocess", default="auto", metavar="auto|stored|FILE",
        help="post-processing: auto (the tune stage's postprocess.json beside --model when present, else the "
        "values stored in the checkpoint), stored, or a tune stage's file",
    )
    predict.add_argument(
        "--scale", type=_scale, default=1.0,
        help="resize the images by this factor before segmenting, so that cells have the competition's pixel size "
        "(e.g. 0.5 for images at twice its magnification); the outputs keep the images' own size",
    )
    predict.add_argument(
        "--tile-overlap", type=_integer(0, MAX_OVERLAP), default=192, metavar="PIXELS",
        help="images larger than 704x520 are segmented in tiles of that size overlapping by at least this much "
        "(more than the largest cell); cells that cross tile borders are merged",
    )
    predict.add_argument("--skip-bad", action="store_true", help="report an unreadable image (skipped.csv) and go on")
    for name, help_text in OUTPUTS.items():
        predict.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True, help=f"write {help_text}".replace("%", "%%"))
    predict.set_defaults(run=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellseg`` console script."""
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
