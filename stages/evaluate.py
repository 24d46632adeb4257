"""DVC stage: evaluate both trained models on the validation split; write metrics, plots and the report."""

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from cellseg import config
from cellseg.checkpoint import load_checkpoint
from cellseg.cli import guarded, stage_args
from cellseg.data import ImageStore
from cellseg.errors import ResourceError
from cellseg.evaluate import evaluate_predictor
from cellseg.inference import load_predictor, postprocess_params
from cellseg.io import write_json
from cellseg.report import write_plots, write_report
from cellseg.tracking import open_tracker
from cellseg.train import pick_device

MODELS = ("unet", "maskrcnn")
log = logging.getLogger("cellseg.evaluate")


def main() -> None:
    args = stage_args(
        __doc__,
        decoded="the decode stage's output directory",
        split="the split JSON",
        coco="COCO json of the validation images",
        models="directory holding <model>/best.pt",
        metrics="directory holding <model>/epochs.csv",
        plots="directory for the plots",
        report="the report to write",
    )
    raw = config.read_params(args.params)
    data, tracking = config.section(raw, "data", path=args.params), config.section(raw, "tracking", path=args.params)
    val = json.loads(args.split.read_text())["val"]
    store = ImageStore(Path(data.root), args.decoded, val)
    coco_gt = json.loads(args.coco.read_text())
    device = pick_device(config.section(raw, "train", path=args.params).unet.device)

    evaluations, checkpoints = [], {}
    for name in MODELS:
        checkpoints[name] = load_checkpoint(args.models / name / "best.pt", name)
        current = config.section(raw, name, path=args.params)  # today's thresholds, not those stored at training
        postprocess = postprocess_params(current, name)
        predictor = load_predictor(args.models / name / "best.pt", device, postprocess)
        evaluations.append(evaluate_predictor(predictor, store, val, coco_gt))
    write_json(args.metrics / "evaluate.json", {e.name: e.metrics for e in evaluations})
    histories = {n: pd.read_csv(args.metrics / n / "epochs.csv").to_dict("records") for n in MODELS}
    plots = write_plots(evaluations, store, val, histories, args.plots)
    write_report(args.report, evaluations, store, val, plots, {n: checkpoints[n]["model_params"] for n in MODELS})
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
