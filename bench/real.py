"""Real-data quality benchmark: train both models on real Sartorius images, score them on real validation images.

    python bench/real.py [--data ../shared/sartorius] [--work DIR] [--out bench/real_results.json]
                         [--plot docs/real_map_vs_cpu_minutes.png] [--quick] [--models unet maskrcnn]
                         [--set unet.target=flows ...] [--synth-set synth.seed=1 ...] [--tta] [--tune]
                         [--no-synthetic | --transfer-only]

It runs the project's own stage scripts (no DVC, tracking off) on a copy of ``params.yaml`` with the budget
below, then scores the checkpoints with the library's evaluation (:func:`cellseg.evaluate.evaluate_predictor`,
as the ``evaluate`` stage does), in three parts:

1. **real**: decode → split → patches → coco → flows → train_unet / train_maskrcnn, on the real images at
   ``--data`` (a Kaggle-format directory, read as it is), scored on its real validation fold with the params'
   post-processing (with ``--tta``, each model a second time with test-time augmentation: ``<model>+tta``; with
   ``--tune``, the tune stage runs and each model is scored again with its tuned file: ``<model>+tuned``, whose
   cross-validated gain the tune stage's metrics give);
2. **synthetic**: the default synthetic pipeline (``params.yaml`` unchanged) up to the trained models;
3. **transfer**: those synthetic-only models scored on the same real validation images (the transfer gap; with
   ``--tune``, also with the tune stage's file searched on the synthetic validation images, as ``make run`` does).
   ``--no-synthetic`` skips 2 and 3; ``--transfer-only`` skips the training of 1 (the real data's stages still
   run, for the validation fold).

On the CPU the budget is :data:`CPU_BUDGET` (≤ 20 minutes of U-Net training on 2 cores); where CUDA is
present, the GPU recipe of the README (:data:`GPU_RECIPE`). ``--set key=value`` changes params of the real
run (e.g. ``unet.target=flows``) on top of the budget; ``--synth-set key=value`` changes the synthetic
pipeline's (e.g. ``synth.seed=1``: other synthetic images; ``train.unet.epochs=6``: a longer schedule).
``--models`` chooses the models (default: the U-Net; both where CUDA is present); Mask R-CNN trains within
the U-Net's budget: 4 × 256 images (the CPU default's ResNet-18 FPN takes ≈ 1.1 s an image on 2 cores,
``docs/benchmarks.md``; real images hold more cells than synthetic ones). It prints a Markdown table (per model and
cell type: competition mAP, COCO mask AP, Dice, cells found against truth, image-level type accuracy,
images/s), writes every figure as JSON (``--out``) and plots the U-Net's validation mAP against the minutes of
training (``--plot``; one point per epoch, from its ``epochs.csv``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cellseg import config  # noqa: E402
from cellseg.data import ImageStore  # noqa: E402
from cellseg.evaluate import evaluate_predictor  # noqa: E402
from cellseg.checkpoint import load_checkpoint  # noqa: E402
from cellseg.inference import predictor  # noqa: E402
from cellseg.tune import TUNED_FILE, read_tuned  # noqa: E402
from cellseg.io import write_json  # noqa: E402
from cellseg.devices import pick_device  # noqa: E402
from gpu import MASKRCNN_RECIPE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
MODELS = ("unet", "maskrcnn")
GROUPS = ("all", "shsy5y", "astro", "cort")

# Training budget on 2 CPU cores (AVX2, no native bfloat16): the U-Net sees 6 × 2,200 windows of 128²
# (≈ 11 windows/s: ≈ 20 min of training, plus ≈ 1 min of validation per epoch); Mask R-CNN (--models maskrcnn)
# 4 × 256 images, about as long.
CPU_BUDGET = {
    "train.unet.epochs": 6,
    "train.unet.samples_per_epoch": 2200,
    "train.unet.lr": 0.002,  # as measured (the default's 0.006 suits its 160 steps)
    "train.maskrcnn.epochs": 4,
    "train.maskrcnn.samples_per_epoch": 256,
}
# The README's full recipe (a GPU).
GPU_RECIPE = {
    "patches.size": 256,
    "train.unet.epochs": 15,
    "train.unet.samples_per_epoch": None,
    "train.unet.batch_size": 64,
    "train.unet.lr": 0.002,
    "train.unet.workers": max(2, min(12, (os.cpu_count() or 4) - 2)),
    **{f"maskrcnn.{key}": value for key, value in MASKRCNN_RECIPE.items()},
    "maskrcnn.image_scale": 2.0,
    "train.maskrcnn.epochs": 30,
    "train.maskrcnn.samples_per_epoch": None,
}
# --quick: a smoke run of the whole chain in a few minutes.
QUICK = {
    "data.limit_images": 12,
    "split.n_folds": 3,
    "synth.images": 6,
    "train.unet.epochs": 1,
    "train.unet.samples_per_epoch": 48,
    "train.maskrcnn.epochs": 1,
    "train.maskrcnn.samples_per_epoch": 2,
    "tune.folds": 2,
}


def write_params(path: Path, settings: dict) -> Path:
    """``params.yaml`` with dotted ``settings`` applied and tracking off, written to ``path``; a key that
    ``params.yaml`` does not have stops the run (a typo would otherwise change nothing)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {"tracking.enabled": False, **settings}.items():
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"{key}: params.yaml has no such key")
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def parse_change(text: str) -> tuple[str, object]:
    """``key=value`` (a dotted params key, a YAML value) → ``(key, value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"{text!r}: expected KEY=VALUE (a dotted params key), e.g. unet.target=flows")
    return key, yaml.safe_load(value)


def run_stage(name: str, params: Path, logs: Path, **paths: Path) -> float:
    """Run ``stages/<name>.py`` with ``--params`` and the path options; returns its wall seconds."""
    command = [sys.executable, str(STAGES / f"{name}.py"), "--params", str(params)]
    for option, value in paths.items():
        command += [f"--{option}", str(value)]
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{params.stem}.{name}.log"
    print(f"  {name} ...", end=" ", flush=True)
    began = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - began
    print(f"{seconds:.0f} s", flush=True)
    if done.returncode:
        raise SystemExit(f"stage {name} failed (exit {done.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return seconds


def pipeline(work: Path, params: Path, logs: Path, models: tuple[str, ...], *, synthesize: bool) -> dict[str, float]:
    """Every stage up to the trained ``models``, in ``work``; returns each stage's seconds."""
    seconds = {}
    if synthesize:
        seconds["synthesize"] = run_stage("synthesize", params, logs, out=work / "raw")
    seconds["decode"] = run_stage("decode", params, logs, out=work / "decoded")
    seconds["split"] = run_stage("split", params, logs, decoded=work / "decoded", out=work / "split.json")
    seconds["patches"] = run_stage(
        "patches", params, logs, decoded=work / "decoded", split=work / "split.json", out=work / "patches.parquet"
    )
    seconds["coco"] = run_stage("coco", params, logs, decoded=work / "decoded", split=work / "split.json", out=work / "coco")
    if "unet" in models:
        seconds["flows"] = run_stage("flows", params, logs, decoded=work / "decoded", out=work / "flows")
        seconds["train_unet"] = run_stage(
            "train_unet", params, logs, decoded=work / "decoded", split=work / "split.json",
            patches=work / "patches.parquet", flows=work / "flows", models=work / "models/unet",
            metrics=work / "metrics/unet",
        )
    if "maskrcnn" in models:
        seconds["train_maskrcnn"] = run_stage(
            "train_maskrcnn", params, logs, decoded=work / "decoded", split=work / "split.json",
            models=work / "models/maskrcnn", metrics=work / "metrics/maskrcnn",
        )
    return seconds


def tune_models(params: Path, logs: Path, work: Path, models: tuple[str, ...]) -> dict[str, float]:
    """The tune stage for each model trained in ``work``; returns each one's seconds."""
    return {
        f"tune_{name}": run_stage(
            "tune", params, logs, decoded=work / "decoded", split=work / "split.json",
            checkpoint=work / f"models/{name}/best.pt", out=work / f"models/{name}/{TUNED_FILE}",
            metrics=work / f"metrics/{name}/tune.json",
        )
        for name in models
    }


def evaluate(
    params: Path, data: Path, models: Path, names: tuple[str, ...], tta: bool = False, tuned_by: Path | None = None
) -> dict[str, dict]:
    """Each model's checkpoint under ``models`` scored on the validation fold of ``data`` (a real pipeline's
    work dir), with the post-processing of ``params``, as the ``evaluate`` stage does; with ``tta``, each model
    again with test-time augmentation (``<model>+tta``); with ``tuned_by`` (the params its tune stage ran with),
    each model again with its tune stage's file, and with test-time augmentation where their ``evaluate.tta``
    names the model, as the tune stage searched it and the ``evaluate`` stage scores it (``<model>+tuned``,
    ``<model>+tta+tuned``)."""
    raw = config.read_params(params)
    val = json.loads((data / "split.json").read_text())["val"]
    store = ImageStore(Path(config.section(raw, "data").root), data / "decoded", val)
    coco_gt = json.loads((data / "coco/coco_val.json").read_text())
    device = pick_device("auto")
    post = config.section(raw, "postprocess")
    tuned = tuned_by is not None
    tuned_tta = config.section(config.read_params(tuned_by), "evaluate").tta if tuned else []
    runs = [(name, name, False, False) for name in names]
    runs += [(f"{name}+tta", name, True, False) for name in names] if tta else []
    runs += [(f"{name}{'+tta' * (name in tuned_tta)}+tuned", name, name in tuned_tta, True) for name in names] if tuned else []
    results = {}
    for key, name, augmented, from_file in runs:
        print(f"  evaluate {key} ...", end=" ", flush=True)
        began = time.perf_counter()
        checkpoint = models / name / "best.pt"
        state = load_checkpoint(checkpoint)
        model_post = read_tuned(models / name / TUNED_FILE, state, augmented) if from_file else None
        model = predictor(state, checkpoint, device, model_post or getattr(post, name), tta=augmented)
        results[key] = evaluate_predictor(model, store, val, coco_gt).metrics
        print(f"{time.perf_counter() - began:.0f} s", flush=True)
    return results


def tune_summary(metrics_dir: Path, models: tuple[str, ...]) -> dict[str, dict]:
    """Each model's tune stage metrics (the gain per cell type) under ``metrics_dir``."""
    return {m: json.loads((metrics_dir / m / "tune.json").read_text()) for m in models}


def training_summary(metrics_dir: Path) -> dict:
    """Epochs, training and validation minutes, and the last epoch's validation figures of one model."""
    epochs = pd.read_csv(metrics_dir / "epochs.csv")
    last = epochs.iloc[-1]
    return {
        "epochs": len(epochs),
        "train_minutes": float(epochs["train_time_s"].sum() / 60),
        "total_minutes": float(epochs["epoch_time_s"].sum() / 60),
        "samples_per_s": float(epochs["train/samples_per_s"].mean()),
        "last_val": {k: float(v) for k, v in last.items() if str(k).startswith("val/")},
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per (run, model, cell type)."""
    keys = [("map", "mAP"), ("coco_segm_AP", "COCO mask AP"), ("dice", "Dice"), ("n_pred", "cells found"),
            ("n_true", "cells (truth)"), ("image_type_accuracy", "type accuracy (images)"), ("images_per_s", "images/s")]
    lines = ["| trained on | model | cell type | " + " | ".join(t for _, t in keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for run, evaluation in results.items():
        for model, metrics in evaluation.items():
            for group in GROUPS:
                cells = []
                for key, _ in keys:
                    value = metrics.get(key if group == "all" else f"{key}/{group}")
                    if key == "images_per_s" and group != "all":
                        value = None
                    cells.append("–" if value is None else f"{value:.0f}" if key.startswith("n_") else f"{value:.3f}")
                lines.append(f"| {run} | {model} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(metrics_dir: Path, path: Path, title: str) -> list[dict]:
    """The U-Net's validation mAP (overall and per type) after each epoch against cumulative training minutes."""
    epochs = pd.read_csv(metrics_dir / "epochs.csv")
    minutes = epochs["train_time_s"].cumsum() / 60
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group in GROUPS:
        column = "val/map" if group == "all" else f"val/map/{group}"
        if column in epochs:
            ax.plot(minutes, epochs[column], marker="o", lw=2.5 if group == "all" else 1.2, label=group)
    ax.set_xlabel("training minutes (2 CPU cores)" if not torch.cuda.is_available() else "training minutes (GPU)")
    ax.set_ylabel("competition mAP (real validation fold)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    columns = ["epoch", "train_time_s", *(c for c in epochs if str(c).startswith("val/map") or str(c).startswith("val/type"))]
    return [{**row, "train_minutes": float(m)} for row, m in zip(epochs[columns].to_dict("records"), minutes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "sartorius", help="Kaggle-format real data")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "real_results.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "real_map_vs_cpu_minutes.png")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the whole chain (minutes)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="the models to train and score (default: unet; both where CUDA is present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params change of the real run (dotted key, YAML value), e.g. unet.target=flows")
    parser.add_argument("--synth-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params change of the synthetic-only pipeline, e.g. synth.seed=1")
    parser.add_argument("--tta", action="store_true", help="score each model with test-time augmentation too")
    parser.add_argument("--tune", action="store_true", help="run the tune stage; score each model with its file too")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--no-synthetic", action="store_true", help="skip the synthetic-only models (the transfer gap)")
    skip.add_argument("--transfer-only", action="store_true",
                      help="train only the synthetic-only models, and score them on the real validation images")
    args = parser.parse_args()
    if not (args.data / "train.csv").is_file():
        raise SystemExit(f"{args.data}: no train.csv (pass --data, a Kaggle-format directory)")
    cuda = torch.cuda.is_available()
    budget = QUICK if args.quick else GPU_RECIPE if cuda else CPU_BUDGET
    models = tuple(args.models or (MODELS if cuda else ("unet",)))
    changes = dict(parse_change(text) for text in args.set)
    synth_changes = dict(parse_change(text) for text in args.synth_set)
    work = args.work or Path(tempfile.mkdtemp(prefix="cellseg-real-"))
    logs = work / "logs"
    began = time.perf_counter()
    real_params = write_params(
        work / "real.yaml", {"data.source": "kaggle", "data.root": str(args.data.resolve()), **budget, **changes}
    )
    synth_settings = {"data.root": str(work / "synthetic/raw")}
    if args.quick:
        synth_settings.update({k: v for k, v in QUICK.items() if k != "data.limit_images"})
    synth_settings.update(synth_changes)
    synth_params = write_params(work / "synthetic.yaml", synth_settings)

    print(f"real data {args.data} → {work / 'real'} (budget: {budget})", flush=True)
    real_models = () if args.transfer_only else models
    real_seconds = pipeline(work / "real", real_params, logs, real_models, synthesize=False)
    if args.tune and real_models:
        real_seconds |= tune_models(real_params, logs, work / "real", real_models)
    results, synth_seconds, runs = {}, {}, {}
    if real_models:
        results["real training folds"] = evaluate(
            real_params, work / "real", work / "real/models", models, args.tta, real_params if args.tune else None
        )
        runs["real"] = work / "real/metrics"
    if not args.no_synthetic:
        changed = f", with {synth_changes}" if synth_changes else ""
        print(f"synthetic default (params.yaml{changed}) → synthetic-only models", flush=True)
        synth_seconds = pipeline(work / "synthetic", synth_params, logs, models, synthesize=True)
        if args.tune:  # tuned on the synthetic validation images, as `make run` tunes them
            synth_seconds |= tune_models(synth_params, logs, work / "synthetic", models)
        print("synthetic-only models on the real validation images", flush=True)
        results["synthetic only (default)"] = evaluate(
            real_params, work / "real", work / "synthetic/models", models, args.tta, synth_params if args.tune else None
        )
        runs["synthetic"] = work / "synthetic/metrics"
    curve = []
    if "unet" in real_models:
        curve = plot_curve(work / "real/metrics/unet", args.plot, "U-Net on real images: mAP per minute of training")
    split = json.loads((work / "real/split.json").read_text())
    record = {
        "command": " ".join(["python bench/real.py", *sys.argv[1:]]),
        "models": list(models),
        "changes": changes,
        "synthetic_changes": synth_changes,
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__},
        "data": str(args.data), "split_counts": split["counts"],
        "budget": budget,
        "stage_seconds": {"real": real_seconds, "synthetic": synth_seconds},
        "training": {run: {m: training_summary(metrics / m) for m in models} for run, metrics in runs.items()},
        "tuning": tune_summary(work / "real/metrics", real_models) if args.tune else {},
        "synthetic_tuning": tune_summary(work / "synthetic/metrics", models) if args.tune and not args.no_synthetic else {},
        "results": results,
        "unet_curve": curve,
        "wall_minutes": (time.perf_counter() - began) / 60,
    }
    write_json(args.out, record)
    print()
    print(table(results))
    print()
    for run, summary in record["training"].items():
        for model, s in summary.items():
            print(f"{run} {model}: {s['epochs']} epochs, {s['train_minutes']:.1f} min training "
                  f"({s['total_minutes']:.1f} min with validation), {s['samples_per_s']:.1f} samples/s")
    print(f"\nwrote {args.out}{f' and {args.plot}' if curve else ''}; work dir {work} ({record['wall_minutes']:.1f} min)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
