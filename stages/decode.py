"""DVC stage: read the data source named in params ``data`` and decode its RLE into label images + tables."""

import argparse
import sys
from pathlib import Path

from cellseg import config
from cellseg.cli import guarded
from cellseg.decode import decode_dataset
from cellseg.sources import load_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = config.load("data", args.params)
    data = load_source(params.source, params.root, limit_images=params.limit_images, seed=params.seed)
    decode_dataset(data, args.out)


if __name__ == "__main__":
    sys.exit(guarded(main))
