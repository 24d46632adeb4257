"""The one training loop, shared by every model family.

A model family plugs in through a :class:`Task` (how to compute its losses on a batch and how to validate);
the loop does the rest: device choice, mixed precision (float16 with loss scaling on CUDA, bfloat16 on a CPU
that computes it natively) and channels_last, AdamW with linear warm-up and cosine decay, gradient clipping,
per-epoch metrics (CSV for ``dvc plots``, MLflow through :mod:`cellseg.tracking`), ``last.pt`` every epoch,
``best.pt`` by the validation metric, and resume from ``last.pt``. Launched by ``torchrun``, it trains with
Distributed Data Parallel (see :mod:`cellseg.distributed` and :func:`fit`).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cellseg import distributed
from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.config import DataParams, TrackingParams, TrainParams
from cellseg.devices import free_memory, pick_device
from cellseg.errors import DataError, ParamsError, TrainingError
from cellseg.io import atomic_path, write_json
from cellseg.plots import training_curves
from cellseg.tracking import DatasetInput, Tracker, run_record, training_tracker

log = logging.getLogger(__name__)

Batch = Any
# What resuming reads from last.pt (best.pt holds only the first five).
RESUME_ENTRIES = ("model_state", "epoch", "best", "history", "run_id", "optimizer", "scheduler", "scaler", "rng")


class Task(Protocol):
    """What the trainer needs from a model family.

    A task whose model has parameters that take no part in the loss also sets ``find_unused_parameters = True``
    (read with a default of False; see :func:`cellseg.distributed.wrap`).
    """

    name: str  # model name, stored in checkpoints
    monitor: str  # validation metric that selects best.pt (higher is better)
    train_bytes_per_pixel: float  # memory a training step takes per input pixel, at least (measured on the CPU)
    collate: Callable | None  # the DataLoader's collate_fn of training batches (None: torch's default) ...
    val_collate: Callable | None  # ... and of validation batches (one image each)

    def train_step(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """Losses of one batch: ``"loss"`` (to minimise) plus any detached per-batch statistics.

        ``model`` is the model being trained, wrapped in DistributedDataParallel under torchrun: call it, do not
        reach into its attributes."""

    def validate(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict[str, float]:
        """Validation metrics over the whole validation set (must include ``monitor``)."""


def mixed_precision(device: torch.device, requested: bool) -> bool:
    """Whether to train in mixed precision: as ``requested`` (``train.<model>.amp``) on CUDA; on the CPU only
    where it computes bfloat16 natively (AVX-512 BF16 or AMX: about 1.5× faster for the U-Net there); on
    other CPUs bfloat16 is emulated, 8× slower than float32 (measured on an AVX2 EPYC), so it stays off."""
    if not requested or device.type == "cuda":
        return requested
    native = device.type == "cpu" and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if not native:
        log.info("amp: this %s has no native bfloat16: training in float32", device.type)
    return native


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision for ``device``: float16 on CUDA (with a loss scaler), bfloat16 on the CPU."""
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16, enabled=enabled)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochLog:
    """Per-epoch metrics as a CSV (rewritten whole each epoch, atomically) that ``dvc plots`` reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, history: list[dict[str, float]]) -> None:
        columns = list(dict.fromkeys(key for row in history for key in row))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


def check_memory(task: Task, train_set: Dataset, batch_size: int, device: torch.device) -> None:
    """Refuse, before any work, a batch that cannot fit in the memory ``device`` has free: ``batch_size`` × the
    first training sample's pixels × ``task.train_bytes_per_pixel`` (a lower bound; no check where free memory
    cannot be told)."""
    free = free_memory(device)
    if free is None or len(train_set) == 0:
        return
    sample = train_set[0]
    image = sample["image"] if isinstance(sample, Mapping) else sample[0]
    pixels = math.prod(image.shape[-2:])
    need = batch_size * pixels * task.train_bytes_per_pixel
    if need > free:
        raise ParamsError(
            f"train.{task.name}.batch_size: {batch_size} samples of {pixels:,} pixels need about {need / 2**30:.1f} GiB "
            f"to train, more than the {free / 2**30:.1f} GiB free on {device}; lower it (or the sample size)"
        )


@dataclass(frozen=True)
class TrainingRun:
    """Where one training's records go, and what they hold besides the weights."""

    model_dir: Path  # last.pt, best.pt
    metrics_dir: Path  # epochs.csv, curves.png, train.json
    tracker: Tracker  # open; under torchrun, other ranks get a do-nothing one (open_tracker gives them that)
    stored: Mapping[str, Any]  # what every checkpoint holds besides the weights: the model's params sections
    params: Mapping[str, Any] = field(default_factory=dict)  # the MLflow run's params, tags and data sets
    tags: Mapping[str, str | None] = field(default_factory=dict)
    inputs: Sequence[DatasetInput] = ()


def training_run(
    raw: Mapping[str, Any], data: DataParams, tracking: TrackingParams, model: str,
    inputs: Sequence[tuple[str | Path, str]], model_dir: Path, metrics_dir: Path, stored: Mapping[str, Any],
) -> TrainingRun:
    """The :class:`TrainingRun` of a training stage: its tracker (params ``tracking``), the data sets ``inputs``
    (``(path, context)``; ``data`` the params section of their source) and every param of ``raw`` recorded."""
    tracker, datasets = training_tracker(tracking, data, model, inputs)
    record = run_record(raw, model=model, inputs=datasets)
    return TrainingRun(model_dir, metrics_dir, tracker, stored, record["run_params"], record["run_tags"], datasets)


@dataclass
class TrainingState:
    """What a training carries from epoch to epoch; ``last.pt`` saves it whole."""

    model: nn.Module  # validated and saved
    trained: nn.Module  # the same weights as trained: wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -math.inf
    epoch: int = 0  # epochs done
    run_id: str | None = None


def fit(
    model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset, config: TrainParams, run: TrainingRun
) -> list[dict[str, float]]:
    """Train ``model`` for ``config.epochs`` epochs; return the per-epoch history.

    ``run.model_dir`` receives ``last.pt`` and ``best.pt``, ``run.metrics_dir`` the per-epoch ``epochs.csv``,
    ``run.tracker`` a run with the params, tags and data sets of ``run`` and every epoch's metrics. With
    ``config.resume`` and a ``last.pt`` present, training continues from it (model, optimizer, scheduler,
    scaler, epoch, history, RNG, MLflow run). A ``train_set`` with a ``set_epoch(seed)`` method (an
    :class:`~cellseg.data.AugmentedDataset`) is reseeded before each epoch, so that its augmentations too are
    the same whether resumed or not.

    Under ``torchrun`` (:mod:`cellseg.distributed`) each process trains on its shard of every epoch with
    ``config.batch_size`` samples per step (the global batch is ``batch_size`` × the number of processes), in
    DistributedDataParallel: gradients are averaged over the processes, so that their weights stay equal. The
    epoch's training statistics are over all processes; rank 0 alone validates, writes the checkpoints and the
    CSV, and logs; every rank returns rank 0's history. On resume every rank loads ``last.pt``.
    """
    # Alike on every rank: their random streams stay alike, so that rank 0's saved RNG state resumes them all.
    seed_everything(config.seed)
    with distributed.session(pick_device(config.device)) as device:
        check_memory(task, train_set, config.batch_size, device)
        loader, val_loader = _loaders(task, train_set, val_set, config, device)
        state = _start(model, task, config, device, len(loader))
        if config.resume:
            _resume(state, run.model_dir / "last.pt", task.name, config.epochs)
        run.tracker.start(params=dict(run.params), tags=dict(run.tags), run_id=state.run_id, inputs=run.inputs)
        epoch_log = EpochLog(run.metrics_dir / "epochs.csv")
        for epoch in range(state.epoch, config.epochs):
            loader.generator.manual_seed(config.seed * 1000 + epoch)  # same order resumed or not, on every rank
            if hasattr(train_set, "set_epoch"):  # and the same augmentations (workers: 0)
                train_set.set_epoch(config.seed * 1000 + epoch)
            row = _epoch(state, task, loader, val_loader, config, device, epoch)
            improved = _record(state, row, task.monitor)
            if distributed.is_main():  # rank 0 alone writes and logs
                _save(state, task, run, improved)
                epoch_log.write(state.history)
                run.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
                log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                         ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
    return state.history


def _loaders(
    task: Task, train_set: Dataset, val_set: Dataset, config: TrainParams, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    """This rank's training loader (:func:`_train_loader`) and the validation loader (one image per batch)."""
    cuda = device.type == "cuda"
    val_loader = DataLoader(
        val_set, batch_size=1, shuffle=False, num_workers=config.workers, collate_fn=task.val_collate,
        pin_memory=cuda, persistent_workers=config.workers > 0,
    )
    return _train_loader(train_set, config, task.collate, cuda), val_loader


def _start(model: nn.Module, task: Task, config: TrainParams, device: torch.device, steps_per_epoch: int) -> TrainingState:
    """The model on ``device`` (channels_last if asked), wrapped for DDP, with a new optimizer, schedule and scaler."""
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch))
    )
    amp = mixed_precision(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    trained = distributed.wrap(model, device, getattr(task, "find_unused_parameters", False))
    return TrainingState(model, trained, optimizer, scheduler, scaler, amp)


def _resume(state: TrainingState, last_path: Path, model_name: str, epochs: int) -> None:
    """Restore the training state of ``last_path`` into ``state`` (on every rank alike), if the file is there."""
    main = distributed.is_main()
    if not last_path.is_file():
        if main:
            log.info("resume requested but %s does not exist: starting from scratch", last_path)
        return
    saved = load_checkpoint(last_path, model_name)
    missing = [key for key in RESUME_ENTRIES if key not in saved]
    if missing:
        raise DataError(f"{last_path}: cannot resume from it: no {', '.join(missing)} (a best.pt, not a last.pt?)")
    try:
        state.model.load_state_dict(saved["model_state"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{last_path}: cannot resume from it: its weights do not fit this model ({reason})") from None
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    state.history, state.best, state.epoch, state.run_id = saved["history"], saved["best"], saved["epoch"], saved["run_id"]
    if main:
        log.info("resuming %s from %s after epoch %d of %d", model_name, last_path, state.epoch, epochs)


def _epoch(
    state: TrainingState, task: Task, loader: DataLoader, val_loader: DataLoader, config: TrainParams,
    device: torch.device, epoch: int,
) -> dict[str, float]:
    """Train one epoch, validate (rank 0), and return the epoch's row of metrics (rank 0's, on every rank)."""
    began = time.perf_counter()
    train_stats, seen = _train_epoch(state, task, loader, config, device, epoch)
    train_time = time.perf_counter() - began
    val_stats = task.validate(state.model, val_loader, device) if distributed.is_main() else {}
    cuda = device.type == "cuda"
    return distributed.broadcast({  # rank 0's: the others did not validate
        "epoch": epoch + 1,
        **{f"train/{k}": v for k, v in train_stats.items()},
        **{f"val/{k}": v for k, v in val_stats.items()},
        "lr": state.scheduler.get_last_lr()[0],
        "train/samples_per_s": seen / train_time,
        "train_time_s": train_time,
        "epoch_time_s": time.perf_counter() - began,
        **({"gpu_peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {}),
    })


def _record(state: TrainingState, row: dict[str, float], monitor: str) -> bool:
    """Append the epoch's ``row`` to the history; whether its ``val/<monitor>`` is the best so far."""
    state.history.append(row)
    state.epoch = int(row["epoch"])
    improved = row[f"val/{monitor}"] > state.best
    state.best = max(state.best, row[f"val/{monitor}"])
    return improved


def _save(state: TrainingState, task: Task, run: TrainingRun, improved: bool) -> None:
    """Write ``last.pt`` (all of ``state``) and, when the epoch ``improved``, ``best.pt`` (the weights and records)."""
    checkpoint = {
        **run.stored,
        "model_state": state.model.state_dict(),
        "epoch": state.epoch,
        "best": state.best,
        "history": state.history,
        "monitor": task.monitor,
        "run_id": run.tracker.run_id,
    }
    if improved:
        save_checkpoint(run.model_dir / "best.pt", task.name, checkpoint)
    resume = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
              "scaler": state.scaler.state_dict(), "rng": _rng_state()}
    save_checkpoint(run.model_dir / "last.pt", task.name, {**checkpoint, **resume})


def _train_loader(train_set: Dataset, config: TrainParams, collate_fn: Callable | None, cuda: bool) -> DataLoader:
    """This rank's batches of its shard of ``samples_per_epoch`` (default: all; more than the data set: whole
    passes, then part of one) random samples per epoch.

    The samples and their order come from the loader's generator, which :func:`fit` seeds alike on every rank
    for each epoch; it also gives the workers' seeds (the DataLoader draws them from it first), so that the
    ranks' workers draw alike augmentations, for different samples.
    """
    generator = torch.Generator()
    drawn = config.samples_per_epoch or len(train_set)
    sampler = distributed.ShardSampler(len(train_set), drawn, generator, distributed.rank(), distributed.world_size())
    return DataLoader(
        train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers, collate_fn=collate_fn,
        pin_memory=cuda, drop_last=len(sampler) > config.batch_size, worker_init_fn=_seed_worker, generator=generator,
    )


def _train_epoch(
    state: TrainingState, task: Task, loader: DataLoader, config: TrainParams, device: torch.device, epoch: int
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns the sample-weighted mean of each statistic and the samples seen, over
    all ranks."""
    model, optimizer, scaler = state.trained, state.optimizer, state.scaler
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    progress = tqdm(
        loader, desc=f"{task.name} epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
        disable=not distributed.is_main(),
    )
    for batch in progress:
        with autocast(device, state.amp):
            stats = task.train_step(model, batch, device)
        loss = stats["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(f"{task.name}: non-finite loss {loss.item()} at epoch {epoch + 1}; lower the lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.scheduler.step()
        n = _batch_size(batch)
        seen += n
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) * n
        progress.set_postfix(loss=f"{loss.item():.4f}")
    seen = int(distributed.all_sum({"seen": seen})["seen"])
    return {key: value / max(seen, 1) for key, value in distributed.all_sum(sums).items()}, seen


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)


def train_tracked(
    model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset, config: TrainParams, run: TrainingRun
) -> dict[str, Any]:
    """:func:`fit`, then the run's records: curves PNG, ``train.json`` summary, MLflow artifacts and best model.

    Writes ``run.model_dir/{last,best}.pt`` and ``run.metrics_dir/{epochs.csv,curves.png,train.json}``; returns
    the summary. Under ``torchrun`` only rank 0 writes and logs them; the other ranks return an empty summary.
    """
    with run.tracker as tracker:
        history = fit(model, task, train_set, val_set, config, run)
        if not distributed.is_main():
            return {}
        curves = run.metrics_dir / "curves.png"
        training_curves(history, curves, f"{task.name}: training curves")
        best = load_checkpoint(run.model_dir / "best.pt", task.name)
        summary = {
            "epochs": len(history),
            "best_epoch": int(best["epoch"]),
            f"best_val_{task.monitor}": float(best["best"]),
            "final": {k: v for k, v in history[-1].items() if k != "epoch"},
            "mlflow_run_id": tracker.run_id,
        }
        write_json(run.metrics_dir / "train.json", summary)
        for path, folder in (
            (curves, "plots"), (run.metrics_dir / "epochs.csv", "metrics"), (run.model_dir / "best.pt", "checkpoints")
        ):
            tracker.log_artifact(path, artifact_path=folder)
        model.load_state_dict(best["model_state"])
        tracker.log_model(model.cpu(), name="model")
    return summary
