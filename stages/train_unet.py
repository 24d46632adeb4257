"""DVC stage: train the U-Net on the patch index with the shared trainer (params ``unet``, ``train.unet``,
``postprocess.unet``, ``tracking``)."""

import json
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.augment import build_augmentations
from cellseg.data import ImageStore, PatchDataset, WholeImageDataset
from cellseg.models.unet import UNetTask, build_unet
from cellseg.models.unet_targets import unet_target
from cellseg.outputs import Kind
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.train import seed_everything, train_tracked, training_run


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        patches=In("the patch index"),
        flows=In("the flows stage's folder (read with unet.target: flows)"),
        models=Out(Kind.FOLDER, "directory of the model's checkpoints (best.pt, last.pt)"),
        metrics=Out(Kind.FOLDER, "directory of the training's metrics files"),
    )
    raw = config.read_params(args.params)
    data, unet, tracking = (config.section(raw, name, path=args.params) for name in ("data", "unet", "tracking"))
    train = config.section(raw, "train", path=args.params).unet
    post = config.section(raw, "postprocess", path=args.params).unet
    split = json.loads(args.split.read_text())
    run = training_run(
        raw, data, tracking, "unet", [(args.decoded, "training"), (args.split, "split")], args.models, args.metrics,
        stored={"model_params": unet.model_dump(), "postprocess": post.model_dump()},
    )

    targets = unet_target(unet, args.flows).pixel_targets
    store = ImageStore(Path(data.root), args.decoded, split["train"] + split["val"], targets)
    train_set = PatchDataset(
        pd.read_parquet(args.patches), store, build_augmentations(unet.augment, seed=train.seed),
        unet.mean, unet.std, unet.channels,
    )
    val_set = WholeImageDataset(split["val"], store, unet.mean, unet.std, unet.channels)
    seed_everything(train.seed)  # the weights' random initialisation
    train_tracked(build_unet(unet), UNetTask(unet, post, train.channels_last), train_set, val_set, train, run)


if __name__ == "__main__":
    sys.exit(guarded(main))
