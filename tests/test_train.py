"""The shared trainer (:mod:`cellseg.train`) and its checkpoints, on CPU with synthetic data and a tiny network.

Torch runs on one thread here: on a shared 2-core machine two intra-op threads make the tiny network's
backward pass ~30× slower, and one thread makes every run bit-reproducible.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, default_collate

from cellseg.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from cellseg.config import TrainParams
from cellseg.augment import build_augmentations
from cellseg.data import IGNORE_INDEX, PatchDataset, WholeImageDataset
from cellseg.errors import DataError, TrainingError
from cellseg.models.unet import UNetTask, build_unet
from cellseg.celltypes import CELL_TYPES
from cellseg.tracking import Tracker, dataset_input, open_tracker, run_record
from cellseg.train import Batch, TrainingRun, autocast, fit, mixed_precision, train_tracked, warmup_cosine
from helpers.fit_job import MEAN, STD, TinyNet, config, new_model, run_in, stable, unet_task_args
from helpers.project import project_params

pytestmark = pytest.mark.usefixtures("one_thread")

HELPER = Path(__file__).parent / "helpers" / "fit_job.py"
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def run_fit(
    sets: tuple[PatchDataset, WholeImageDataset],
    out: Path,
    cfg: TrainParams,
    task: UNetTask | None = None,
    tracker: Tracker | None = None,
) -> list[dict[str, float]]:
    """``fit`` a fresh seeded :class:`TinyNet` into ``out/models`` and ``out/epochs.csv``."""
    return fit(new_model(), task or UNetTask(*unet_task_args()), *sets, cfg, run_in(out, tracker))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_best_is_argmax(models: Path, history: list[dict[str, float]], monitor: str = "val/map") -> None:
    """best.pt holds the first epoch with the highest monitored value (improvement is strict)."""
    best = load_checkpoint(models / "best.pt", "unet")
    values = [row[monitor] for row in history]
    assert best["epoch"] == int(np.argmax(values)) + 1
    assert best["best"] == max(values)


class Interrupted(Exception):
    """Stands for a crash in the middle of an epoch."""


class InterruptAt(UNetTask):
    """:class:`UNetTask` that fails in the validation of epoch ``epoch`` (after that epoch's training)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(*unet_task_args())
        self.epoch, self.calls = epoch, 0

    def validate(self, model: nn.Module, loader: Iterable[dict], device: torch.device) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.epoch:
            raise Interrupted
        return super().validate(model, loader, device)


class NaNTask(UNetTask):
    """:class:`UNetTask` whose loss is NaN."""

    def train_step(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        stats = super().train_step(model, batch, device)
        return {**stats, "loss": stats["loss"] * math.nan}


def test_warmup_cosine() -> None:
    factor = warmup_cosine(total_steps=20, warmup_steps=4)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    decay = [factor(s) for s in range(4, 21)]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert factor(12) == pytest.approx(0.5)  # half-way through the decay
    assert factor(25) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    assert warmup_cosine(10, 0)(0) == pytest.approx(1.0)  # no warm-up: starts at the peak


def test_training_steps_lower_the_loss(sets: tuple[PatchDataset, WholeImageDataset]) -> None:
    """A U-Net (resnet18 encoder) trained on one fixed batch of patches: the loss goes down."""
    torch.manual_seed(0)
    params = project_params("unet", encoder="resnet18")
    model, task, device = build_unet(params), UNetTask(*unet_task_args(encoder="resnet18")), torch.device("cpu")
    batch = default_collate([sets[0][i] for i in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        before = float(task.train_step(model, batch, device)["loss"])
    for _ in range(3):
        loss = task.train_step(model, batch, device)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        stats = task.train_step(model, batch, device)
    assert set(stats) == {"loss", "ce", "dice_loss", "type_ce", "iou", "dice", "type_accuracy"}
    assert math.isfinite(before) and float(stats["loss"]) < before


def _two_type_batch(patches: PatchDataset, per_type: int = 4) -> dict[str, torch.Tensor]:
    """``per_type`` windows of each of the first two cell types among ``patches``."""
    types = np.array([int(patches[i]["type"]) for i in range(len(patches))])
    first, second = np.unique(types)[:2]
    picked = [*np.flatnonzero(types == first)[:per_type], *np.flatnonzero(types == second)[:per_type]]
    return default_collate([patches[int(i)] for i in picked])


def test_type_head_learns(sets: tuple[PatchDataset, WholeImageDataset]) -> None:
    """A tiny resnet18 U-Net on windows of two cell types: a few steps teach its head the windows' types; with
    ``type_loss_weight: 0`` the head gets no gradient."""
    batch = _two_type_batch(sets[0])
    params, post, _ = unet_task_args(encoder="resnet18", decoder_channels=[16] * 5, type_loss_weight=1.0)
    torch.manual_seed(0)
    model = build_unet(params)
    task = UNetTask(params, post, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        stats = task.train_step(model, batch, CPU)
        optimizer.zero_grad()
        stats["loss"].backward()
        optimizer.step()
        history.append((stats["type_ce"].item(), stats["type_accuracy"].item()))
    with torch.no_grad():
        last = task.train_step(model, batch, CPU)
    assert float(last["type_ce"]) < 0.1 * history[0][0] and float(last["type_accuracy"]) == 1.0, history

    unweighted = UNetTask(params.model_copy(update={"type_loss_weight": 0.0}), post, False)
    model.zero_grad()
    unweighted.train_step(model, batch, CPU)["loss"].backward()
    assert all(not p.grad.any() for p in model.classification_head.parameters())
    assert any(p.grad.any() for p in model.segmentation_head.parameters())


class ReplayNet(nn.Module):
    """Stands for a trained model: returns the given (class logits, cell-type logits), one image per call."""

    def __init__(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, type_logits = self.outputs[self.calls]
        self.calls += 1
        assert logits.shape[2:] == x.shape[2:]
        return logits, type_logits


def test_validate_scores_instances_with_the_predicted_cell_type(sets: tuple[PatchDataset, WholeImageDataset]) -> None:
    """Exact pixel classes for all three images (one per cell type) and a chosen cell type for each. cort's
    minimum size is huge: an image's cells survive unless *predicted* cort, whatever its true type."""
    store = sets[1].store
    val = WholeImageDataset(store.image_ids, store, MEAN, STD, 3)
    assert sorted(store.cell_type(i) for i in store.image_ids) == sorted(CELL_TYPES)
    guess = {"cort": "shsy5y", "shsy5y": "cort", "astro": "astro"}
    outputs = []
    for item in val:
        pixels = item["target"].masked_fill(item["target"] == IGNORE_INDEX, 0)
        logits = 20.0 * F.one_hot(pixels, 3).permute(2, 0, 1).float().unsqueeze(0)
        type_logits = 20.0 * F.one_hot(torch.tensor([CELL_TYPES.index(guess[item["cell_type"]])]), 3).float()
        outputs.append((logits, type_logits))
    post = project_params("postprocess.unet", min_size={"shsy5y": 1, "astro": 1, "cort": 10**6})
    task = UNetTask(project_params("unet", target="boundary"), post, False)  # the replayed three classes
    loader = DataLoader(val, batch_size=1, collate_fn=WholeImageDataset.collate)

    metrics = task.validate(ReplayNet(outputs), loader, CPU)

    assert metrics["type_accuracy"] == pytest.approx(1 / 3)
    assert [metrics[f"type_accuracy/{t}"] for t in ("astro", "cort", "shsy5y")] == [1.0, 0.0, 0.0]
    assert metrics["iou"] == metrics["dice"] == 1.0
    assert metrics["map/cort"] == 1.0  # scored with shsy5y's minimum size: every cell kept, rebuilt exactly
    assert metrics["map/astro"] > 0.5  # astro's keeps its cells (some thin ones lose pieces to the 1-px boundary)
    assert metrics["map/shsy5y"] == 0.0  # predicted cort: every cell below the minimum size
    assert metrics["map"] == pytest.approx((1.0 + metrics["map/astro"]) / 3)


def test_mixed_precision_on_cuda_is_as_requested() -> None:
    cuda = torch.device("cuda")
    assert mixed_precision(cuda, True) is True and mixed_precision(cuda, False) is False


def test_mixed_precision_on_cpu_needs_native_bfloat16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On this machine's CPU (no AVX-512 BF16 or AMX) it is off; a CPU with native bfloat16 gets it."""
    assert mixed_precision(CPU, True) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger="cellseg.train"):
        assert mixed_precision(CPU, True) is False
    assert "no native bfloat16: training in float32" in caplog.text
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert mixed_precision(CPU, True) is True
    assert mixed_precision(CPU, False) is False


def test_autocast_dtype_per_device() -> None:
    assert autocast(torch.device("cuda"), False).fast_dtype == torch.float16
    assert autocast(CPU, True).fast_dtype == torch.bfloat16
    layer = nn.Linear(4, 4)
    with autocast(CPU, True):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


class AutocastRecorder(UNetTask):
    """:class:`UNetTask` that records whether each training step ran under CPU autocast, and in which dtype."""

    def __init__(self) -> None:
        super().__init__(*unet_task_args())
        self.steps: list[tuple[bool, torch.dtype]] = []

    def train_step(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        self.steps.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().train_step(model, batch, device)


@pytest.mark.parametrize("native", [False, True])
def test_fit_on_cpu_trains_in_bfloat16_only_where_native(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    task = AutocastRecorder()
    history = run_fit(sets, tmp_path, config(epochs=1, amp=True), task=task)
    assert task.steps == [(native, torch.bfloat16)] * 2
    assert math.isfinite(history[0]["train/loss"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_applies_on_cpu(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path, channels_last: bool
) -> None:
    model = new_model()
    fit(model, UNetTask(*unet_task_args()), *sets, config(epochs=1, channels_last=channels_last), run_in(tmp_path))
    weight = model.features[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert weight.is_contiguous() is not channels_last


def test_best_checkpoint_follows_the_tasks_monitor(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path
) -> None:
    """best.pt is the epoch of the highest ``val/<monitor>`` (here Dice, set to peak at epoch 2; the tiny
    network's mAP stays 0, so a trainer watching mAP would keep epoch 1)."""
    dice = iter([0.2, 0.5, 0.3])

    class DiceMonitored(UNetTask):
        monitor = "dice"

        def validate(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict[str, float]:
            return {**super().validate(model, loader, device), "dice": next(dice)}

    history = run_fit(sets, tmp_path, config(epochs=3), task=DiceMonitored(*unet_task_args()))
    assert [row["val/dice"] for row in history] == [0.2, 0.5, 0.3]
    assert_best_is_argmax(tmp_path / "models", history, monitor="val/dice")
    assert load_checkpoint(tmp_path / "models" / "best.pt", "unet")["epoch"] == 2


def test_fit_writes_metrics_and_checkpoints(sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path) -> None:
    history = run_fit(sets, tmp_path, config(epochs=2))
    rows = read_csv(tmp_path / "epochs.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for split, metrics in (("train", ("type_ce", "type_accuracy")), ("val", ("map", "type_accuracy"))):
        for metric in ("loss", "iou", "dice", *metrics):
            values = [float(row[f"{split}/{metric}"]) for row in rows]
            assert values == pytest.approx([h[f"{split}/{metric}"] for h in history])
            assert all(map(math.isfinite, values))
    assert all(0 < row["train_time_s"] <= row["epoch_time_s"] for row in history)
    last = load_checkpoint(tmp_path / "models" / "last.pt", "unet")
    assert last["epoch"] == 2 and stable(last["history"]) == stable(history)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last)
    TinyNet().load_state_dict(last["model_state"])
    assert_best_is_argmax(tmp_path / "models", history)


@pytest.fixture(scope="module")
def straight_run(sets: tuple[PatchDataset, WholeImageDataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run A: 3 epochs without interruption."""
    out = tmp_path_factory.mktemp("run_a")
    run_fit(sets, out, config(epochs=3))
    return out


def test_resume_after_a_crash_matches_a_straight_run(
    sets: tuple[PatchDataset, WholeImageDataset], straight_run: Path, tmp_path: Path
) -> None:
    """Run B plans 3 epochs like A, crashes during epoch 3 (after its training, before its checkpoint) and
    is resumed: on one CPU thread with workers 0 the same operations run on the same restored state (weights,
    AdamW moments, LR schedule, RNG, data order), so B reproduces A to float32 rounding noise. The tolerance
    (1e-6 relative) only admits last-bit differences; an epoch changes the weights by far more (checked)."""
    with pytest.raises(Interrupted):
        run_fit(sets, tmp_path, config(epochs=3), task=InterruptAt(3))
    at_two = load_checkpoint(tmp_path / "models" / "last.pt", "unet")
    assert at_two["epoch"] == 2
    history = run_fit(sets, tmp_path, config(epochs=3, resume=True))

    a_last = load_checkpoint(straight_run / "models" / "last.pt", "unet")
    b_last = load_checkpoint(tmp_path / "models" / "last.pt", "unet")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for row, straight in zip(stable(history), stable(a_last["history"]), strict=True):
        assert row == pytest.approx(straight, rel=1e-6)
    assert [row["epoch"] for row in read_csv(tmp_path / "epochs.csv")] == ["1", "2", "3"]
    for key, weights in a_last["model_state"].items():
        torch.testing.assert_close(b_last["model_state"][key], weights, rtol=1e-6, atol=1e-7)
    changed = max((a_last["model_state"][k] - v).abs().max() for k, v in at_two["model_state"].items())
    assert changed > 1e-4
    assert_best_is_argmax(tmp_path / "models", history)


def test_resume_with_augmentation_in_the_main_process_is_exact(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path
) -> None:
    """With augmentations and ``workers: 0`` the augmentation's own RNG is reseeded each epoch (``set_epoch``),
    so a resumed run draws the flips an uninterrupted one draws: both end with the same weights."""
    train_set, val_set = sets
    augmented = copy.copy(train_set)
    augmented.augment = build_augmentations(["hflip", "vflip", "rotate90", "transpose"], seed=0)
    run_fit((augmented, val_set), tmp_path / "a", config(epochs=2))
    with pytest.raises(Interrupted):
        run_fit((augmented, val_set), tmp_path / "b", config(epochs=2), task=InterruptAt(2))
    run_fit((augmented, val_set), tmp_path / "b", config(epochs=2, resume=True))
    a = load_checkpoint(tmp_path / "a" / "models" / "last.pt", "unet")
    b = load_checkpoint(tmp_path / "b" / "models" / "last.pt", "unet")
    for key, weights in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], weights, rtol=1e-6, atol=1e-7)
    plain = load_checkpoint(run_fit_dir(sets, tmp_path / "plain"), "unet")  # the augmentations did change training
    assert any(not torch.allclose(plain["model_state"][k], v) for k, v in a["model_state"].items())


def run_fit_dir(sets: tuple[PatchDataset, WholeImageDataset], out: Path) -> Path:
    """``last.pt`` of a 2-epoch :func:`run_fit` into ``out``."""
    run_fit(sets, out, config(epochs=2))
    return out / "models" / "last.pt"


def test_resume_with_more_epochs_continues_the_history(
    sets: tuple[PatchDataset, WholeImageDataset], straight_run: Path, tmp_path: Path
) -> None:
    """Run B trains 2 epochs (epochs=2), then resumes with epochs=3. The history continues without a lost or
    repeated epoch, but B does not reproduce A: the LR schedule (warm-up + cosine) is planned from
    ``epochs``, so B's first run decays to 0 at the end of epoch 2 while A's LR is still well above 0, and
    the resumed run re-plans it for 3 epochs (with tracking on, ``train.unet.epochs`` is a logged param and
    resuming the MLflow run with a changed value is refused). Only epoch 1 (warm-up and early decay steps
    with identical LR factors) matches A's training statistics."""
    first = run_fit(sets, tmp_path, config(epochs=2))
    history = run_fit(sets, tmp_path, config(epochs=3, resume=True))
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert stable(history[:2]) == stable(first)
    assert [row["epoch"] for row in read_csv(tmp_path / "epochs.csv")] == ["1", "2", "3"]
    a = load_checkpoint(straight_run / "models" / "last.pt", "unet")["history"]
    assert history[0]["train/loss"] == a[0]["train/loss"]
    assert first[1]["lr"] == pytest.approx(0.0, abs=1e-12) and a[1]["lr"] > 0.0
    assert load_checkpoint(tmp_path / "models" / "last.pt", "unet")["epoch"] == 3


def test_resume_after_sigkill(data_root: Path, sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path) -> None:
    """SIGKILL a training process once its first last.pt exists, then resume: every epoch 1..6 is recorded
    exactly once and the checkpoints load (they are replaced atomically: a kill can at most leave a hidden
    ``.<name>.*.tmp`` beside them)."""
    epochs = 6
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            [sys.executable, str(HELPER), str(data_root), str(tmp_path), "--epochs", str(epochs), "--delay", "0.4"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    last = tmp_path / "models" / "last.pt"
    deadline = time.monotonic() + 60
    try:
        while not last.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    killed = load_checkpoint(last, "unet")
    assert 1 <= killed["epoch"] < epochs
    leftovers = sorted(p.name for p in tmp_path.rglob("*.tmp"))
    assert all(name.startswith((".last.pt.", ".best.pt.", ".epochs.csv.")) for name in leftovers), leftovers

    history = run_fit(sets, tmp_path, config(epochs=epochs, resume=True))
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    assert history[: killed["epoch"]] == killed["history"]
    assert [row["epoch"] for row in read_csv(tmp_path / "epochs.csv")] == [str(e) for e in range(1, epochs + 1)]
    assert load_checkpoint(last, "unet")["epoch"] == epochs
    assert_best_is_argmax(tmp_path / "models", history)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "rcnn.pt", "maskrcnn", {"model_state": TinyNet().state_dict(), "epoch": 1})
    assert load_checkpoint(tmp_path / "rcnn.pt", "maskrcnn")["epoch"] == 1
    with pytest.raises(DataError, match=r"'maskrcnn'.*'unet'"):
        load_checkpoint(tmp_path / "rcnn.pt", "unet")


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "full.pt", "unet", {"model_state": TinyNet().state_dict()})
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt", "unet")


@pytest.mark.parametrize("change", ["tensor", "number", "bytes"])
def test_checkpoint_content_hash_catches_a_changed_checkpoint(tmp_path: Path, change: str) -> None:
    """A checkpoint changed after saving (a weight, an epoch number, bytes flipped on disk) no longer matches the
    hash saved with it, though it unpickles without a word; the unchanged one loads."""
    path = tmp_path / "last.pt"
    state = {"model_state": {"w": torch.linspace(0, 1, 50_000), "h": torch.ones(3, dtype=torch.bfloat16)}, "epoch": 4}
    save_checkpoint(path, "unet", state)
    loaded = load_checkpoint(path, "unet")
    assert torch.equal(loaded["model_state"]["w"], state["model_state"]["w"]) and loaded["epoch"] == 4
    raw = torch.load(path, weights_only=True)
    if change == "tensor":
        raw["model_state"]["w"][123] = 1e24
        torch.save(raw, path)
    elif change == "number":
        raw["epoch"] = 5
        torch.save(raw, path)
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        assert torch.load(path, weights_only=True)["epoch"] == 4  # loads as if nothing happened
    with pytest.raises(DataError, match="last.pt: checkpoint is corrupt: its content does not match the sha256 hash"):
        load_checkpoint(path, "unet")


def test_checkpoint_without_a_hash_is_refused(tmp_path: Path) -> None:
    torch.save({"format": FORMAT, "version": 1, "model": "unet", "model_state": {}}, tmp_path / "old.pt")
    with pytest.raises(DataError, match=f"old.pt: checkpoint format version 1; this cellseg reads {VERSION}"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_batch_beyond_free_memory_is_refused_before_training(sets: tuple[PatchDataset, WholeImageDataset]) -> None:
    """A batch one sample larger than the free memory holds (by the U-Net's bytes per pixel) is refused; 2 fit."""
    from cellseg.devices import free_memory
    from cellseg.errors import ParamsError
    from cellseg.train import check_memory

    train_set = sets[0]
    task = UNetTask(*unet_task_args())
    free = free_memory(torch.device("cpu"))
    if free is None:
        pytest.skip("free memory cannot be told on this machine")
    pixels = math.prod(train_set[0]["image"].shape[-2:])
    batch = int(free / (pixels * task.train_bytes_per_pixel)) + 1
    with pytest.raises(ParamsError, match=f"train.unet.batch_size: {batch} samples of {pixels:,} pixels need about"):
        check_memory(task, train_set, batch, torch.device("cpu"))
    check_memory(task, train_set, 2, torch.device("cpu"))


class Payload:
    """Unpickling this object creates the directory ``marker``: code run from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


class Opaque:
    """A plain class instance: not one of the types a weights-only checkpoint may hold."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize("kind", ["payload", "instance"])
def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code-ran"
    content = Payload(marker) if kind == "payload" else Opaque()
    torch.save({"format": FORMAT, "version": VERSION, "model": "unet", "content": content}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt.*unsafe"):
        load_checkpoint(tmp_path / "evil.pt", "unet")
    assert not marker.exists()
    if kind == "payload":  # control: the payload is live under a plain unpickler
        pickle.loads(pickle.dumps(Payload(tmp_path / "control")))
        assert (tmp_path / "control").is_dir()


def test_non_finite_loss_stops_training(sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="non-finite loss"):
        run_fit(sets, tmp_path, config(epochs=1), task=NaNTask(*unet_task_args()))
    assert not (tmp_path / "models" / "last.pt").exists()


@pytest.fixture
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracking URI or DVC experiment from the environment (restored afterwards: MLflow exports the URI)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def test_fit_without_tracking_writes_nothing_to_the_cwd(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mlflow_env: None
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with open_tracker(enabled=False, uri=None, experiment="cellseg-test", run_name="unet") as tracker:
        run_fit(sets, tmp_path / "out", config(epochs=1), tracker=tracker)
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "out" / "models" / "last.pt").is_file()


def test_train_tracked_records_the_run(
    data_root: Path,
    sets: tuple[PatchDataset, WholeImageDataset],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_mlflow_env: None,
) -> None:
    """Per-epoch metrics, params, tags and data inputs from run_record, artifacts and a loadable model in a
    sqlite store."""
    import mlflow.pytorch
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
    cfg = config(epochs=2)
    inputs = [
        dataset_input("synthetic", data_root / "raw", data_root / "patches.parquet", "training"),
        dataset_input("synthetic", data_root / "raw", data_root / "decoded", "validation"),
    ]
    raw = {"data": {"source": "synthetic"}, "train": {"unet": cfg.model_dump()}, "unet": {"encoder": "tiny"}}
    record = run_record(raw, "unet", inputs, repo_dir=REPO)
    assert record["run_tags"]["data_source"] == "synthetic" and record["run_inputs"] == inputs
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = TrainingRun(
        tmp_path / "models", tmp_path / "metrics",
        open_tracker(enabled=True, uri=uri, experiment="train-test", run_name="unet"),
        {"model_params": {"encoder": "tiny"}}, record["run_params"], record["run_tags"], record["run_inputs"],
    )
    summary = train_tracked(new_model(), UNetTask(*unet_task_args()), *sets, cfg, run)
    history = load_checkpoint(tmp_path / "models" / "last.pt", "unet")["history"]
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "unet"
    assert run.data.params == {k: str(v) for k, v in record["run_params"].items()}
    assert "train.unet.epochs" in run.data.params and "train.unet.resume" not in run.data.params
    assert {k: v for k, v in record["run_tags"].items() if v is not None}.items() <= run.data.tags.items()
    logged_inputs = {d.dataset.digest: d for d in run.inputs.dataset_inputs}
    assert sorted(logged_inputs) == sorted(i.digest for i in inputs)
    for expected_input in inputs:
        logged = logged_inputs[expected_input.digest]
        assert logged.dataset.name == "synthetic:raw"
        assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == expected_input.context
    for key in history[0]:
        if key != "epoch":
            logged = client.get_metric_history(run.info.run_id, key)
            assert [(m.step, m.value) for m in logged] == [(row["epoch"], pytest.approx(row[key])) for row in history]

    def listed(folder: str) -> list[str]:
        return [a.path for a in client.list_artifacts(run.info.run_id, folder)]

    assert listed("plots") == ["plots/curves.png"] and listed("metrics") == ["metrics/epochs.csv"]
    assert listed("checkpoints") == ["checkpoints/best.pt"]
    best = load_checkpoint(client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path)), "unet")
    assert summary["best_epoch"] == best["epoch"] == int(np.argmax([r["val/map"] for r in history])) + 1

    expected = TinyNet()
    expected.load_state_dict(best["model_state"])
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)
