"""DVC stage: train Mask R-CNN on the decode stage's whole images and instances with the shared trainer (params
``maskrcnn``, ``train.maskrcnn``, ``postprocess.maskrcnn``, ``tracking``)."""

import json
import sys
from pathlib import Path

from cellseg import config
from cellseg.augment import build_augmentations
from cellseg.data import ImageStore
from cellseg.models.maskrcnn import InstanceDataset, MaskRCNNTask, build_maskrcnn
from cellseg.outputs import Kind
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.train import seed_everything, train_tracked, training_run


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        models=Out(Kind.FOLDER, "directory of the model's checkpoints (best.pt, last.pt)"),
        metrics=Out(Kind.FOLDER, "directory of the training's metrics files"),
    )
    raw = config.read_params(args.params)
    data, maskrcnn, tracking = (config.section(raw, n, path=args.params) for n in ("data", "maskrcnn", "tracking"))
    train = config.section(raw, "train", path=args.params).maskrcnn
    post = config.section(raw, "postprocess", path=args.params).maskrcnn
    split = json.loads(args.split.read_text())
    run = training_run(
        raw, data, tracking, "maskrcnn", [(args.decoded, "training"), (args.split, "split")], args.models,
        args.metrics, stored={"model_params": maskrcnn.model_dump(), "postprocess": post.model_dump()},
    )

    store = ImageStore(Path(data.root), args.decoded, split["train"] + split["val"])
    augment = build_augmentations(maskrcnn.augment, seed=train.seed)
    train_set = InstanceDataset(store, args.decoded, split["train"], augment)
    val_set = InstanceDataset(store, args.decoded, split["val"])
    seed_everything(train.seed)  # the weights' random initialisation
    train_tracked(build_maskrcnn(maskrcnn), MaskRCNNTask(maskrcnn, post), train_set, val_set, train, run)


if __name__ == "__main__":
    sys.exit(guarded(main))
