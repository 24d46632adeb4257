"""DVC stage: assign images to folds (params ``split``) and write the train/validation split as JSON."""

import sys

import pandas as pd

from cellseg import config
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.decode import IMAGES_TABLE
from cellseg.io import write_json
from cellseg.outputs import Kind
from cellseg.split import make_split


def main() -> None:
    args = stage_args(__doc__, decoded=In("the decode stage's output directory"), out=Out(Kind.FILE, "the split JSON"))
    params = config.load("split", args.params)
    images = pd.read_parquet(args.decoded / IMAGES_TABLE)
    write_json(args.out, make_split(images, params.n_folds, params.fold, params.seed))


if __name__ == "__main__":
    sys.exit(guarded(main))
