"""DVC stage: index one training window per annotated cell of the training split (params ``patches``)."""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.cli import guarded
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE
from cellseg.io import write_parquet
from cellseg.patches import sample_patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--decoded", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
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
