"""DVC stage: search one trained model's post-processing per cell type on the validation images (params
``tune``; the start is ``postprocess.<model>``, the outputs those of ``evaluate.tta``) and write it next to the
checkpoint, for ``evaluate`` and ``cellseg predict``."""

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.checkpoint import load_checkpoint
from cellseg.data import ImageStore
from cellseg.decode import IMAGES_TABLE
from cellseg.devices import pick_device
from cellseg.inference import predictor
from cellseg.io import write_json
from cellseg.outputs import Kind
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.tune import loosest, tune, tuning_metrics, write_tuning

log = logging.getLogger("cellseg.tune")


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        checkpoint=In("the model's best.pt"),
        out=Out(Kind.FILE, "the tuned post-processing file (postprocess.json beside the checkpoint)"),
        metrics=Out(Kind.FILE, "the tuning's scores (JSON)"),
    )
    raw = config.read_params(args.params)
    data, search = config.section(raw, "data", path=args.params), config.section(raw, "tune", path=args.params)
    state = load_checkpoint(args.checkpoint)
    name = state["model"]
    tta = name in config.section(raw, "evaluate", path=args.params).tta
    device = pick_device(getattr(config.section(raw, "train", path=args.params), name).device)
    post = getattr(config.section(raw, "postprocess", path=args.params), name)
    grid = getattr(search, name).model_dump()
    model = predictor(state, args.checkpoint, device, loosest(post, grid), tta=tta)  # outputs for every candidate
    val = json.loads(args.split.read_text())["val"]
    images = pd.read_parquet(args.decoded / IMAGES_TABLE, columns=["image_id", "sample_id", "cell_type"])
    images = images.drop_duplicates("image_id").set_index("image_id").loc[val].reset_index()
    store = ImageStore(Path(data.root), args.decoded, val)
    tuning = tune(model, store, images, post, grid, rounds=search.rounds, folds=search.folds, seed=search.seed)
    settings = {"grid": {f: grid[f] for f in model.post_fields}, "rounds": search.rounds, "folds": search.folds,
                "seed": search.seed}
    write_tuning(args.out, tuning, state, tta=tta, search=settings)
    write_json(args.metrics, tuning_metrics(tuning))
    for kind, scores in tuning.scores.items():
        log.info("%s %s: mAP %s", name, kind, ", ".join(f"{g} {v:.3f}" for g, v in scores.items()))


if __name__ == "__main__":
    sys.exit(guarded(main))
