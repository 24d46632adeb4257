"""DVC stage: write the embedded synthetic data set (Kaggle format) from params ``synth``."""

import sys

from cellseg import config
from cellseg.stage import Out, guarded, stage_args
from cellseg.outputs import Kind
from cellseg.sources.synthetic import synthesize


def main() -> None:
    args = stage_args(__doc__, data_root=False, out=Out(Kind.TREE, "the data set's directory"))
    params = config.load("synth", args.params)
    synthesize(args.out, n_images=params.images, seed=params.seed)


if __name__ == "__main__":
    sys.exit(guarded(main))
