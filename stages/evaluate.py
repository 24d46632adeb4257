"""DVC stage: evaluate both trained models on the validation split, with their tuned post-processing (params
``evaluate.postprocess``); write metrics, plots and the report."""

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.checkpoint import load_checkpoint
from cellseg.stage import In, Out, guarded, stage_args
from cellseg.data import ImageStore
from cellseg.errors import ParamsError, ResourceError
from cellseg.evaluate import evaluate_predictor
from cellseg.inference import predictor
from cellseg.io import write_json
from cellseg.outputs import Kind
from cellseg.report import write_plots, write_report
from cellseg.tracking import open_tracker
from cellseg.tune import read_tuned, tuned_summary
from cellseg.devices import pick_device

log = logging.getLogger("cellseg.evaluate")


def main() -> None:
    args = stage_args(
        __doc__,
        decoded=In("the decode stage's output directory"),
        split=In("the split JSON"),
        coco=In("COCO json of the validation images"),
        checkpoints=In("each model's best.pt", many=True),
        histories=In("each model's epochs.csv, in the order of --checkpoints", many=True),
        postprocess=In("each model's tuned postprocess.json (the tune stage's), in the order of --checkpoints", many=True),
        metrics=Out(Kind.FILE, "the metrics JSON to write"),
        plots=Out(Kind.FOLDER, "directory for the plots"),
        report=Out(Kind.FILE, "the report to write"),
    )
    for option in ("histories", "postprocess"):
        if len(getattr(args, option)) != len(args.checkpoints):
            given = len(getattr(args, option))
            raise ParamsError(f"--{option}: {given} file(s) for {len(args.checkpoints)} checkpoint(s)")
    raw = config.read_params(args.params)
    data, tracking = config.section(raw, "data", path=args.params), config.section(raw, "tracking", path=args.params)
    val = json.loads(args.split.read_text())["val"]
    store = ImageStore(Path(data.root), args.decoded, val)
    coco_gt = json.loads(args.coco.read_text())
    train = config.section(raw, "train", path=args.params)
    post = config.section(raw, "postprocess", path=args.params)  # today's, not those stored at training
    settings = config.section(raw, "evaluate", path=args.params)

    evaluations, checkpoints, histories, sources = [], {}, {}, {}
    for path, history, tuned in zip(args.checkpoints, args.histories, args.postprocess):
        checkpoint = load_checkpoint(path)
        name = checkpoint["model"]
        if name in checkpoints:
            raise ParamsError(f"--checkpoints: two checkpoints of model {name!r}")
        checkpoints[name], histories[name] = checkpoint, pd.read_csv(history).to_dict("records")
        device = pick_device(getattr(train, name).device)  # each model on its own train.<model>.device
        tta = name in settings.tta
        if settings.postprocess == "tuned":
            model_post = read_tuned(tuned, checkpoint, tta)
            sources[name] = tuned_summary(tuned)
        else:
            model_post = getattr(post, name)
            sources[name] = "from params.yaml (evaluate.postprocess: params)"
        if tta:
            sources[name] += "; scored with test-time augmentation (`evaluate.tta`)"
        model = predictor(checkpoint, path, device, model_post, tta=tta)
        evaluations.append(evaluate_predictor(model, store, val, coco_gt))
    write_json(args.metrics, {e.name: e.metrics for e in evaluations})
    plots = write_plots(evaluations, store, val, histories, args.plots)
    write_report(
        args.report, evaluations, store, val, plots, {n: c["model_params"] for n, c in checkpoints.items()}, sources
    )
    _log_to_runs(tracking, checkpoints, evaluations, plots)


def _log_to_runs(tracking, checkpoints, evaluations, plots) -> None:
    """Add the evaluation's metrics and plots to each model's own MLflow run."""
    for e in evaluations:
        run_id = checkpoints[e.name].get("run_id")
        if not (tracking.enabled and run_id):
            continue
        with open_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_name=None) as tracker:  # keeps the run its name
            try:
                tracker.start(params={}, tags={}, run_id=run_id)
            except ResourceError as exc:  # e.g. the run was deleted from the store, or it is another store
                log.warning("evaluation not added to the %s MLflow run: %s", e.name, exc)
                continue
            tracker.log_metrics({f"eval/{k}": v for k, v in e.metrics.items()}, step=int(checkpoints[e.name]["epoch"]))
            for path in plots.values():
                tracker.log_artifact(path, artifact_path="evaluation")


if __name__ == "__main__":
    sys.exit(guarded(main))
