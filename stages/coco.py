"""DVC stage: export the split's train and validation images as COCO instance files (coco_train/val.json)."""

import json
import sys

import pandas as pd

from cellseg import config
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.coco import to_coco, write_coco
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE
from cellseg.errors import DataError
from cellseg.outputs import Kind


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        out=Out(Kind.FOLDER, "directory for coco_train.json and coco_val.json"),
    )
    params = config.load("split", args.params)
    split = json.loads(args.split.read_text())
    asked = {"n_folds": params.n_folds, "fold": params.fold, "seed": params.seed}
    made = {key: split.get(key) for key in asked}
    if made != asked:
        raise DataError(f"{args.split}: made for {made}, but params split is {asked}: rerun the split stage")
    images = pd.read_parquet(args.decoded / IMAGES_TABLE)
    instances = pd.read_parquet(args.decoded / INSTANCES_TABLE)
    for part in ("train", "val"):
        write_coco(args.out / f"coco_{part}.json", to_coco(images, instances, split[part]))


if __name__ == "__main__":
    sys.exit(guarded(main))
