"""DVC stage: read the data source named in params ``data`` and decode its RLE into label images + tables."""

import sys

from cellseg import config
from cellseg.stage import Out, guarded, stage_args
from cellseg.decode import decode_dataset
from cellseg.outputs import Kind
from cellseg.sources.read import load_source


def main() -> None:
    args = stage_args(__doc__, out=Out(Kind.TREE, "the decoded data set's directory"))
    params = config.load("data", args.params)
    data = load_source(params.source, params.root, limit_images=params.limit_images, seed=params.seed)
    decode_dataset(data, args.out)


if __name__ == "__main__":
    sys.exit(guarded(main))
