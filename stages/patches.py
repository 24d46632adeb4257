"""DVC stage: index one training window per annotated cell of the training split (params ``patches``)."""

import json
import sys

import pandas as pd

from cellseg import config
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE
from cellseg.io import write_parquet
from cellseg.outputs import Kind
from cellseg.patches import sample_patches


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        out=Out(Kind.FILE, "the patch index (Parquet)"),
    )
    params = config.load("patches", args.params)
    index = sample_patches(
        pd.read_parquet(args.decoded / INSTANCES_TABLE),
        pd.read_parquet(args.decoded / IMAGES_TABLE),
        json.loads(args.split.read_text())["train"],
        **params.model_dump(),
    )
    write_parquet(args.out, index)


if __name__ == "__main__":
    sys.exit(guarded(main))
