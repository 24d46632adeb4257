"""DVC stage: cellpose's flows of every decoded label image, once, for the U-Net's ``flows`` target (params
``unet.target``; with ``boundary`` the folder is left empty: nothing reads it)."""

import sys

import pandas as pd

from cellseg import config
from cellseg.decode import IMAGES_TABLE
from cellseg.flows import write_flows
from cellseg.outputs import Kind
from cellseg.stage import In, Out, guarded, stage_args


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        out=Out(Kind.TREE, "the folder of flows (<image id>.npz)"),
    )
    unet = config.load("unet", args.params)
    image_ids = pd.read_parquet(args.decoded / IMAGES_TABLE, columns=["image_id"])["image_id"].unique()
    write_flows(args.decoded, image_ids if unet.target == "flows" else [], args.out)


if __name__ == "__main__":
    sys.exit(guarded(main))
