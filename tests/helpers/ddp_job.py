"""A training job for the DDP tests (``tests/test_distributed.py``), run under torchrun on the gloo backend::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/ddp_job.py DATA_ROOT OUT_DIR \\
        [--epochs 3] [--crash-at EPOCH] [--resume] [--tracking-uri URI]

Every rank runs :func:`cellseg.train.train_tracked` with the same arguments, as a stage script does: a
:class:`PlainNet` (initialised from the rank as seed: DDP must start all from rank 0's weights) trained by a
:class:`RecordingTask` on the patches of ``DATA_ROOT`` (:func:`helpers.fit_job.make_data`), 2 per step and
8 per epoch over the ranks, into ``OUT_DIR/models`` and ``OUT_DIR/metrics``. Then each rank saves what it
did to ``OUT_DIR/rank<RANK>.pt``: its model's weights (rank 0's: the best epoch's, which train_tracked loads),
summary, the task's records and the files it wrote under ``OUT_DIR`` (from Python's audit events: cellseg renames each output into place; the MLflow store is a
sqlite file that is connected to).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `helpers` importable

from cellseg.data import PatchDataset
from cellseg.models.unet import UNetTask
from cellseg.celltypes import CELL_TYPES
from cellseg.tracking import open_tracker
from cellseg.train import TrainingRun, train_tracked
from helpers.fit_job import config, datasets, unet_task_args

BATCH_SIZE = 2  # per process
SAMPLES_PER_EPOCH = 8  # over all processes


class PlainNet(nn.Module):
    """Two convolutions and a linear cell-type head on their pooled features, no BatchNorm or dropout: its
    gradient over a batch is the mean of per-sample gradients, so that 2 processes × batch b train exactly as
    1 process × batch 2b."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 3, 3, padding=1)
        self.type_head = nn.Linear(8, len(CELL_TYPES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), self.type_head(features.mean(dim=(2, 3)))


class Indexed(Dataset):
    """A :class:`PatchDataset` whose items also carry their ``index``."""

    def __init__(self, patches: PatchDataset) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.patches[i], "index": i}


class Crash(Exception):
    """Stands for a crash in the middle of a run."""


class RecordingTask(UNetTask):
    """:class:`UNetTask` with the plain cross-entropy loss (a mean over the batch's pixels) that records the
    indices of each training batch, the model classes it trained and validated, and its process group; its
    ``crash_at``-th validation raises :class:`Crash`."""

    find_unused_parameters = False  # PlainNet uses all its parameters: DDP's default, as for Mask R-CNN

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(*unet_task_args(loss="ce"))
        self.crash_at, self.validations = crash_at, 0
        self.batches: list[list[int]] = []
        self.trained: set[str] = set()
        self.validated: set[str] = set()
        self.group: tuple[str, int, int] | None = None

    def train_step(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        self.batches.append(batch["index"].tolist())
        self.trained.add(type(model).__name__)
        if dist.is_initialized():
            self.group = (dist.get_backend(), dist.get_world_size(), dist.get_rank())
        return super().train_step(model, batch, device)

    def validate(self, model: nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, float]:
        self.validations += 1
        self.validated.add(type(model).__name__)
        if self.validations == self.crash_at:
            raise Crash
        return super().validate(model, loader, device)

    def records(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "trained": sorted(self.trained), "validated": sorted(self.validated),
            "group": self.group,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    out = args.out.resolve()
    writes: list[str] = []

    def audit(event: str, arguments: tuple) -> None:
        if event in ("os.rename", "sqlite3.connect"):
            path = str(arguments[1] if event == "os.rename" else arguments[0])
            if path.startswith(str(out)):
                writes.append(os.path.relpath(path, out))

    sys.addaudithook(audit)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    train_set, val_set = datasets(args.data)
    model, task = PlainNet(seed=rank), RecordingTask(args.crash_at)
    cfg = config(epochs=args.epochs, batch_size=BATCH_SIZE, samples_per_epoch=SAMPLES_PER_EPOCH, resume=args.resume)
    tracker = open_tracker(args.tracking_uri is not None, args.tracking_uri, "ddp-test", run_name="unet")
    run = TrainingRun(out / "models", out / "metrics", tracker, {"model_params": {}}, {"train.unet.epochs": args.epochs})
    summary = train_tracked(model, task, Indexed(train_set), val_set, cfg, run)
    results = {"state": model.state_dict(), "summary": summary, "writes": list(writes), **task.records()}
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
