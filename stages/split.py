"""DVC stage: assign images to folds (params ``split``) and write the train/validation split as JSON."""

import argparse
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.cli import guarded
from cellseg.decode import IMAGES_TABLE
from cellseg.io import write_json
from cellseg.split import make_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--decoded", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = config.load("split", args.params)
    images = pd.read_parquet(args.decoded / IMAGES_TABLE)
    write_json(args.out, make_split(images, params.n_folds, params.fold, params.seed))


if __name__ == "__main__":
    sys.exit(guarded(main))
