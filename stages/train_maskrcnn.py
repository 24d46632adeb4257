"""DVC stage: train Mask R-CNN on the whole images and masks of the coco stage's json files with the shared trainer (params ``maskrcnn``, ``train.maskrcnn``, ``tracking``)."""

import sys

from cellseg import config
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.sources.coco import coco_to_source
from cellseg.augment import build_augmentations
from cellseg.models.maskrcnn import InstanceDataset, MaskRCNNTask, build_maskrcnn, collate
from cellseg.tracking import run_record, training_tracker
from cellseg.outputs import Kind
from cellseg.train import seed_everything, train_tracked


def main() -> None:
    args = stage_args(
        __doc__,
        coco_train=In("the coco stage's training json (coco_train.json)"),
        coco_val=In("the coco stage's validation json (coco_val.json)"),
        models=Out(Kind.FOLDER, "directory of the model's checkpoints (best.pt, last.pt)"),
        metrics=Out(Kind.FOLDER, "directory of the training's metrics files"),
    )
    raw = config.read_params(args.params)
    data, maskrcnn, tracking = (config.section(raw, n, path=args.params) for n in ("data", "maskrcnn", "tracking"))
    train = config.section(raw, "train", path=args.params).maskrcnn
    tracker, inputs = training_tracker(
        tracking, data, "maskrcnn", [(args.coco_train, "training"), (args.coco_val, "validation")]
    )

    augment = build_augmentations(maskrcnn.augment, seed=train.seed)
    train_set = InstanceDataset(coco_to_source(args.coco_train, data.root), augment)
    val_set = InstanceDataset(coco_to_source(args.coco_val, data.root))
    seed_everything(train.seed)  # the weights' random initialisation
    model = build_maskrcnn(maskrcnn)
    train_tracked(
        model,
        MaskRCNNTask(maskrcnn),
        train_set,
        val_set,
        train,
        model_dir=args.models,
        metrics_dir=args.metrics,
        tracker=tracker,
        model_params=maskrcnn.model_dump(),
        **run_record(raw, model="maskrcnn", inputs=inputs),
        collate_fn=collate,
        val_collate_fn=collate,
    )


if __name__ == "__main__":
    sys.exit(guarded(main))
