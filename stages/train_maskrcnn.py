"""DVC stage: train Mask R-CNN on whole training images with the shared trainer (params ``maskrcnn``, ``train.maskrcnn``, ``tracking``)."""

import json
import sys
from pathlib import Path

from cellseg import config
from cellseg.cli import guarded, stage_args
from cellseg.data import ImageStore, build_augmentations
from cellseg.models.maskrcnn import InstanceDataset, MaskRCNNTask, build_maskrcnn, collate
from cellseg.tracking import open_tracker, run_record
from cellseg.train import train_tracked


def main() -> None:
    args = stage_args(
        __doc__,
        decoded="the decode stage's output directory",
        split="the split JSON",
        models="directory of the models' checkpoints",
        metrics="directory of the metrics files",
    )
    raw = config.read_params(args.params)
    data, maskrcnn, tracking = (config.section(raw, n, path=args.params) for n in ("data", "maskrcnn", "tracking"))
    train = config.section(raw, "train", path=args.params).maskrcnn
    split = json.loads(args.split.read_text())
    tracker = open_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_name="maskrcnn")

    store = ImageStore(Path(data.root), args.decoded, split["train"] + split["val"])
    train_set = InstanceDataset(split["train"], store, build_augmentations(maskrcnn.augment, seed=train.seed))
    val_set = InstanceDataset(split["val"], store)
    train_tracked(
        build_maskrcnn(maskrcnn),
        MaskRCNNTask(maskrcnn),
        train_set,
        val_set,
        train,
        model_dir=args.models,
        metrics_dir=args.metrics,
        tracker=tracker,
        model_params=maskrcnn.model_dump(),
        **run_record(raw, model="maskrcnn"),
        collate_fn=collate,
        val_collate_fn=collate,
    )


if __name__ == "__main__":
    sys.exit(guarded(main))
