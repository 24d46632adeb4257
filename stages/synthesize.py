"""DVC stage: write the embedded synthetic data set (Kaggle format) from params ``synth``."""

import argparse
import sys
from pathlib import Path

from cellseg import config
from cellseg.cli import guarded
from cellseg.sources.synthetic import synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = config.load("synth", args.params)
    synthesize(args.out, n_images=params.images, seed=params.seed)


if __name__ == "__main__":
    sys.exit(guarded(main))
