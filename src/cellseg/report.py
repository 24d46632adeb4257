"""The evaluation's figures and ``reports/compare.md``: the models side by side, per cell type, with plots and params."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cellseg.data import ImageStore
from cellseg.evaluate import ModelEvaluation
from cellseg.io import atomic_path
from cellseg.metrics import MAX_DETS
from cellseg.registry import MODELS
from cellseg.plots import bars_by_cell_type, compare_curves, overlay, score_vs_threshold
from cellseg.celltypes import CELL_TYPES

COLUMNS = (
    ("n_pred", "cells predicted"),
    ("recall50", "true cells found (IoU 0.5)"),
    ("map", "mAP@.5:.95 (competition)"),
    ("coco_segm_AP", "COCO mask AP"),
    ("iou", "pixel IoU"),
    ("dice", "Dice"),
    ("image_type_accuracy", "cell type right (images)"),
)


def _value(metrics: Mapping[str, float], key: str, group: str) -> float | None:
    return metrics.get(key if group == "all" else f"{key}/{group}")


def _fmt(value: float | None, key: str) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:.0f}" if key.startswith("n_") else f"{value:.3f}"


def comparison_table(evaluations: Sequence[ModelEvaluation], groups: Sequence[str]) -> str:
    """A Markdown table: per cell type, one row per model, one column per metric."""
    header = ["cell type", "cells (truth)", "model", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        truth = _fmt(_value(evaluations[0].metrics, "n_true", group), "n_true")
        for e in evaluations:
            row = [group, truth, MODELS[e.name].display, *(_fmt(_value(e.metrics, k, group), k) for k, _ in COLUMNS)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def strengths(evaluations: Sequence[ModelEvaluation], groups: Sequence[str]) -> list[str]:
    """One sentence per cell type naming the better model by the competition mAP, with the margin (or saying
    that none leads when their mAPs round alike)."""
    sentences = [
        f"- **{MODELS[e.name].display} found no cell** above its score thresholds: it is undertrained (see its "
        "training curves); the CPU default trains it for a few steps only, the full recipe (README) on a GPU for real."
        for e in evaluations
        if e.metrics.get("n_pred") == 0
    ]
    for group in groups:
        scored = sorted(
            ((_value(e.metrics, "map", group) or 0.0, MODELS[e.name].display) for e in evaluations), reverse=True
        )
        if len(scored) > 1:
            (best, name), (second, other) = scored[0], scored[1]
            if f"{best:.3f}" == f"{second:.3f}":
                sentences.append(f"- **{group}**: no model leads: {name} and {other} both reach mAP {best:.3f}.")
            else:
                sentences.append(f"- **{group}**: {name} leads with mAP {best:.3f} against {second:.3f} ({other}).")
    return sentences


def write_plots(
    evaluations: Sequence[ModelEvaluation],
    store: ImageStore,
    image_ids: Sequence[str],
    histories: Mapping[str, Sequence[dict[str, float]]],
    plots_dir: Path,
) -> dict[str, Path]:
    """Every evaluation figure as PNG (plus score(t) as CSV for ``dvc plots``); returns caption → path."""
    types = sorted({store.cell_type(i) for i in image_ids})
    plots = {
        "Training curves (validation)": plots_dir / "curves.png",
        "Competition mAP per cell type": plots_dir / "map_by_cell_type.png",
        "score(t) against the IoU threshold": plots_dir / "score_vs_threshold.png",
    }
    compare_curves(histories, plots["Training curves (validation)"])
    bars_by_cell_type({e.name: {t: e.metrics[f"map/{t}"] for t in types} for e in evaluations}, plots["Competition mAP per cell type"], "mAP")
    score_vs_threshold({e.name: e.per_threshold["all"] for e in evaluations}, plots["score(t) against the IoU threshold"])
    table = pd.DataFrame({e.name: e.per_threshold["all"] for e in evaluations}).rename_axis("threshold").reset_index()
    with atomic_path(plots_dir / "score_vs_threshold.csv") as tmp:
        table.to_csv(tmp, index=False)
    for cell_type in types:
        image_id = next(i for i in image_ids if store.cell_type(i) == cell_type)
        for e in evaluations:
            found = e.predictions[image_id]
            names = None
            if any(found.classes):  # a model that names cell types: type and confidence at each cell
                names = [f"{CELL_TYPES[c - 1] if c else 'cell'} {s:.2f}" for c, s in zip(found.classes, found.scores)]
            caption = f"Overlay: {MODELS[e.name].display}, {cell_type} image"
            plots[caption] = plots_dir / f"overlay_{e.name}_{cell_type}.png"
            overlay(store.image(image_id), found.labels, plots[caption], f"{e.name} · {cell_type} · {image_id}", names)
    return plots


def write_report(
    path: Path,
    evaluations: Sequence[ModelEvaluation],
    store: ImageStore,
    image_ids: Sequence[str],
    plots: Mapping[str, Path],
    params: Mapping[str, Mapping[str, Any]],
    postprocess: Mapping[str, str] = {},
) -> None:
    """Write the comparison report; ``plots`` maps a caption to a PNG path, ``params`` a model to its params,
    ``postprocess`` a model to where its post-processing values came from."""
    groups = ["all", *sorted({store.cell_type(i) for i in image_ids})]
    lines = [
        "# Model comparison",
        "",
        f"Validation split: {len(image_ids)} whole images. mAP is the competition metric (mean over IoU thresholds "
        "0.50:0.95 of TP/(TP+FP+FN), averaged over images); a true cell is found when a predicted one overlaps it "
        f"at IoU > 0.5; COCO mask AP comes from pycocotools (up to {MAX_DETS:,} detections per image, as "
        "LIVECell's evaluator, per class with each model's predicted classes); IoU and Dice are of the "
        "foreground pixels. The models see the images only: every cell type they use (per-type post-processing "
        "included) is their own prediction.",
        "",
        comparison_table(evaluations, groups),
        "",
        *(f"- {MODELS[name].display}: post-processing {source}." for name, source in postprocess.items()),
        "",
        "## What each is good at",
        "",
        *strengths(evaluations, groups),
        *(f"- {MODELS[name].describe(MODELS[name].params.model_validate(values))}" for name, values in params.items()),
    ]
    for e in evaluations:
        line = f"- {MODELS[e.name].display}: inference at {e.metrics['images_per_s']:.1f} images/s on this machine"
        if e.metrics.get("image_type_accuracy") is not None:
            line += f"; it names the cell type of {100 * e.metrics['image_type_accuracy']:.1f}% of the images"
        if e.metrics.get("type_accuracy", float("nan")) == e.metrics.get("type_accuracy"):  # present and not NaN
            line += f" and of {100 * e.metrics['type_accuracy']:.1f}% of the cells it finds"
        lines.append(line + ".")
    lines += ["", "## Plots", ""]
    for caption, plot in plots.items():
        lines += [f"### {caption}", "", f"![{caption}]({Path(os.path.relpath(plot, path.parent)).as_posix()})", ""]
    lines += ["## Params that produced them", ""]
    for name, values in params.items():
        lines += [f"### {MODELS[name].display}", "", "| param | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in values.items()]
        lines.append("")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
