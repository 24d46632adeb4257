"""A small, fast training job for the trainer tests: synthetic data, a tiny network, CPU settings.

Imported by the tests (``from helpers.fit_job import ...``) and run as a script by the kill-and-resume
test::

    python tests/helpers/fit_job.py DATA_ROOT OUT_DIR --epochs 6 --delay 0.4 [--resume]

which trains into ``OUT_DIR/models/{last,best}.pt`` and ``OUT_DIR/metrics/epochs.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `helpers` importable

from cellseg.config import TrainParams, UNetParams, UNetPostprocess
from cellseg.data import ImageStore, PatchDataset, WholeImageDataset, targets_from_labels
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, decode_dataset
from cellseg.models.unet import UNetTask
from cellseg.patches import sample_patches
from cellseg.celltypes import CELL_TYPES
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize
from cellseg.train import TrainingRun, fit
from cellseg.tracking import Tracker, open_tracker
from helpers.project import project_params

PATCH = 64
MEAN, STD = 0.5, 0.25


class TinyNet(nn.Module):
    """A two-layer fully convolutional 3-class segmenter with a cell-type head (as the U-Net's: it returns
    ``(class logits, cell-type logits)``): trains and validates in milliseconds on CPU.

    Its dropout makes training depend on torch's RNG, so that resuming must restore the RNG state."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout2d(0.2),
        )
        self.head = nn.Conv2d(8, 3, 3, padding=1)
        self.type_head = nn.Linear(8, len(CELL_TYPES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), self.type_head(features.mean(dim=(2, 3)))


def unet_task_args(**changes: object) -> tuple[UNetParams, UNetPostprocess, bool]:
    """:class:`UNetTask`'s arguments: params.yaml's ``unet`` with the ``boundary`` target (:class:`TinyNet`'s three
    classes; the trainer's tests' data have no flows) and ``changes``, ``postprocess.unet``, no channels_last."""
    return project_params("unet", **{"target": "boundary", **changes}), project_params("postprocess.unet"), False


def run_in(out: Path, tracker: Tracker | None = None, **records: object) -> TrainingRun:
    """A :class:`TrainingRun` writing checkpoints to ``out/models`` and ``out/epochs.csv`` (no tracking by default)."""
    return TrainingRun(out / "models", out, tracker or Tracker(), {"model_params": {}}, **records)


class SlowTask(UNetTask):
    """:class:`UNetTask` whose validation sleeps ``delay`` seconds, so that a run can be killed mid-way."""

    def __init__(self, delay: float) -> None:
        super().__init__(*unet_task_args(loss="ce_dice"))
        self.delay = delay

    def validate(self, model: nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, float]:
        time.sleep(self.delay)
        return super().validate(model, loader, device)


def make_data(root: Path) -> Path:
    """Synthesize and decode 3 images under ``root`` and index 64-pixel patches of the first two."""
    synthesize(root / "raw", n_images=3, seed=0)
    decode_dataset(load_source("synthetic", root / "raw"), root / "decoded")
    images = pd.read_parquet(root / "decoded" / IMAGES_TABLE)
    index = sample_patches(
        pd.read_parquet(root / "decoded" / INSTANCES_TABLE), images, list(images["image_id"][:2]),
        size=PATCH, jitter=0.5, per_cell=1, background_fraction=0.1, seed=0,
    )
    index.to_parquet(root / "patches.parquet")
    return root


TIMING = ("train/samples_per_s", "train_time_s", "epoch_time_s")  # wall-clock columns: differ between any two runs


def stable(rows: Iterable[dict[str, float]]) -> list[dict[str, float]]:
    """History rows without their wall-clock columns."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def datasets(root: Path) -> tuple[PatchDataset, WholeImageDataset]:
    """Training patches of images 1–2 (no augmentation) and whole-image validation on image 3."""
    ids = list(pd.read_parquet(root / "decoded" / IMAGES_TABLE)["image_id"])
    store = ImageStore(root / "raw", root / "decoded", ids, lambda _, labels: targets_from_labels(labels, 1))
    train_set = PatchDataset(pd.read_parquet(root / "patches.parquet"), store, None, MEAN, STD, 3)
    return train_set, WholeImageDataset(ids[2:], store, MEAN, STD, 3)


def config(**overrides: object) -> TrainParams:
    """Deterministic CPU settings: 2 batches of 4 patches per epoch, no workers."""
    settings = {
        "epochs": 2, "batch_size": 4, "lr": 1e-2, "warmup_epochs": 0.5, "workers": 0, "amp": False,
        "channels_last": False, "device": "cpu", "samples_per_epoch": 8, "seed": 0,
    }
    return project_params("train.unet", **{**settings, **overrides})


def new_model(seed: int = 0) -> TinyNet:
    """A :class:`TinyNet` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return TinyNet()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the tests do: fast and reproducible on a shared 2-core machine
    train_set, val_set = datasets(args.data)
    cfg = config(epochs=args.epochs, resume=args.resume)
    tracker = open_tracker(enabled=False, uri=None, experiment="cellseg-test")
    run = TrainingRun(args.out / "models", args.out / "metrics", tracker, {"model_params": {}})
    fit(new_model(), SlowTask(args.delay), train_set, val_set, cfg, run)


if __name__ == "__main__":
    main()
