"""Training under torchrun (Distributed Data Parallel), on CPU with 2 processes on the gloo backend.

The DDP runs are ``tests/helpers/ddp_job.py`` launched by ``python -m torch.distributed.run``; each rank
saves its weights, history and records to ``rank<RANK>.pt``. A run without torchrun is the reference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cellseg import distributed
from cellseg.checkpoint import load_checkpoint
from cellseg.data import PatchDataset, WholeImageDataset
from cellseg.models.unet import UNetTask, build_unet
from cellseg.tracking import Tracker, open_tracker
from cellseg.train import fit
from helpers.ddp_job import BATCH_SIZE, SAMPLES_PER_EPOCH, Indexed, PlainNet, RecordingTask
from helpers.fit_job import config, run_in, stable, unet_task_args

pytestmark = pytest.mark.usefixtures("one_thread")

JOB = Path(__file__).parent / "helpers" / "ddp_job.py"
EPOCHS = 3
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")








def torchrun(data_root: Path, out: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the DDP job on 2 CPU processes in ``out`` (where MLflow puts its artifacts); with ``check``, fail
    with its output unless it exits 0."""
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB),
         str(data_root), str(out), "--epochs", str(EPOCHS), *options],
        cwd=out, capture_output=True, text=True, timeout=120, check=False,
    )
    if check:
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return job


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]




@pytest.fixture(scope="module")
def ddp_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A straight DDP run of 3 epochs, tracked in a sqlite MLflow store."""
    out = tmp_path_factory.mktemp("ddp_run")
    torchrun(data_root, out, "--tracking-uri", f"sqlite:///{out}/mlflow.db")
    return out


@pytest.fixture(scope="module")
def single_run(sets: tuple[PatchDataset, WholeImageDataset], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The same job without torchrun, in one process with twice the per-process batch: its history, final
    weights and training batches."""
    out = tmp_path_factory.mktemp("single_run")
    model, task = PlainNet(seed=0), RecordingTask()
    cfg = config(epochs=EPOCHS, batch_size=2 * BATCH_SIZE, samples_per_epoch=SAMPLES_PER_EPOCH)
    history = fit(model, task, Indexed(sets[0]), sets[1], cfg, run_in(out))
    return history, model.state_dict(), task.batches


def test_ddp_writes_one_set_of_records_from_rank_0(ddp_run: Path) -> None:
    zero, one = ranks(ddp_run)
    assert zero["group"] == ("gloo", 2, 0) and one["group"] == ("gloo", 2, 1)
    assert zero["trained"] == one["trained"] == ["DistributedDataParallel"]
    assert zero["validated"] == ["PlainNet"] and one["validated"] == []
    assert one["writes"] == [] and one["summary"] == {}
    outputs = {"models/last.pt", "models/best.pt", "metrics/epochs.csv", "metrics/curves.png", "metrics/train.json"}
    assert outputs | {"mlflow.db"} <= set(zero["writes"])
    assert {str(p.relative_to(ddp_run)) for p in ddp_run.rglob("*") if p.is_file()} >= outputs
    assert not list(ddp_run.rglob("*.tmp"))

    last = load_checkpoint(ddp_run / "models" / "last.pt", "unet")
    best = load_checkpoint(ddp_run / "models" / "best.pt", "unet")
    PlainNet().load_state_dict(last["model_state"])  # plain keys: no "module." prefix
    PlainNet().load_state_dict(best["model_state"])
    assert last["epoch"] == EPOCHS and {"optimizer", "scheduler", "scaler", "rng"} <= set(last)
    epochs = (ddp_run / "metrics" / "epochs.csv").read_text().splitlines()
    assert epochs[0].startswith("epoch,train/loss,") and [row.split(",")[0] for row in epochs[1:]] == ["1", "2", "3"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ddp_run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    assert [run.info.run_id for run in runs] == [zero["summary"]["mlflow_run_id"]]
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == EPOCHS


def test_ddp_ranks_end_with_equal_weights(ddp_run: Path) -> None:
    """Rank 1's final weights are rank 0's (as saved in last.pt), though each rank initialised its own:
    DDP starts both from rank 0's and averages their gradients."""
    one = ranks(ddp_run)[1]
    last = load_checkpoint(ddp_run / "models" / "last.pt", "unet")
    assert last["model_state"].keys() == one["state"].keys()
    for key, weights in last["model_state"].items():
        assert torch.equal(one["state"][key], weights), key
    key = "features.0.weight"
    assert PlainNet(seed=0).state_dict()[key].ne(PlainNet(seed=1).state_dict()[key]).any()


def test_ddp_ranks_train_on_disjoint_shards(ddp_run: Path, single_run: tuple) -> None:
    """Each epoch, the two ranks get 4 different samples each, 8 together; at each step, their two batches
    of 2 are the batch of 4 of the same step without torchrun."""
    zero, one = ranks(ddp_run)
    single = single_run[2]
    steps = SAMPLES_PER_EPOCH // (2 * BATCH_SIZE)  # per epoch
    assert len(zero["batches"]) == len(one["batches"]) == len(single) == EPOCHS * steps
    for mine, theirs, both in zip(zero["batches"], one["batches"], single):
        assert len(mine) == len(theirs) == BATCH_SIZE and sorted(mine + theirs) == sorted(both)
    for epoch in range(EPOCHS):
        batches = slice(epoch * steps, (epoch + 1) * steps)
        mine = {i for batch in zero["batches"][batches] for i in batch}
        theirs = {i for batch in one["batches"][batches] for i in batch}
        assert len(mine) == len(theirs) == SAMPLES_PER_EPOCH // 2 and not mine & theirs
    assert zero["batches"][:steps] != zero["batches"][steps : 2 * steps]  # a new draw each epoch


def test_two_processes_train_as_one_with_twice_the_batch(ddp_run: Path, single_run: tuple) -> None:
    """DDP averages the gradients of the two per-process batches of 2: for a model without BatchNorm or
    dropout and a loss that is a mean over samples, one step is the step of one process on their batch of 4.
    So 3 epochs (6 AdamW steps with warm-up, cosine decay and clipping) of both end with the same weights and
    metrics, to float32 rounding of the different summation order."""
    history, weights, _ = single_run
    last = load_checkpoint(ddp_run / "models" / "last.pt", "unet")
    for key, value in weights.items():
        torch.testing.assert_close(last["model_state"][key], value, rtol=1e-5, atol=1e-7)
    assert (weights["features.0.weight"] - PlainNet(seed=0).state_dict()["features.0.weight"]).abs().max() > 1e-3
    for ddp, one in zip(stable(last["history"]), stable(history), strict=True):
        for key in ("train/loss", "lr", *(k for k in one if k.startswith("val/"))):
            assert ddp[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_ddp_resume_after_a_crash_matches_a_straight_run(data_root: Path, ddp_run: Path, tmp_path: Path) -> None:
    """A DDP run that crashes in epoch 3 (rank 0 fails in validation; torchrun stops rank 1) and is resumed
    under torchrun (every rank loads last.pt) ends as the straight DDP run, in the same MLflow run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    crashed = torchrun(data_root, tmp_path, "--tracking-uri", uri, "--crash-at", "3", check=False)
    assert crashed.returncode != 0
    first = load_checkpoint(tmp_path / "models" / "last.pt", "unet")
    assert first["epoch"] == 2
    torchrun(data_root, tmp_path, "--tracking-uri", uri, "--resume")
    zero, one = ranks(tmp_path)
    resumed = load_checkpoint(tmp_path / "models" / "last.pt", "unet")
    straight = load_checkpoint(ddp_run / "models" / "last.pt", "unet")
    assert len(one["batches"]) == SAMPLES_PER_EPOCH // (2 * BATCH_SIZE)  # epoch 3 only
    assert one["batches"] == ranks(ddp_run)[1]["batches"][-len(one["batches"]) :]
    for key, value in straight["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][key], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(one["state"][key], resumed["model_state"][key])
    for row, expected in zip(stable(resumed["history"]), stable(straight["history"]), strict=True):
        assert row == pytest.approx(expected, rel=1e-6)
    assert zero["summary"]["mlflow_run_id"] == first["run_id"]


def test_without_torchrun_nothing_is_distributed(
    sets: tuple[PatchDataset, WholeImageDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    task = RecordingTask()
    fit(PlainNet(), task, Indexed(sets[0]), sets[1], config(epochs=1), run_in(tmp_path))
    assert task.group is None and not dist.is_initialized()
    assert task.trained == task.validated == {"PlainNet"}


@pytest.mark.parametrize("find_unused", [True, False])
def test_unet_under_ddp_needs_find_unused_parameters(find_unused: bool) -> None:
    """The EfficientNet U-Net has parameters outside its graph (see ``UNetTask.find_unused_parameters``): DDP
    trains it with the flag and fails at the second step without it (shown in a group of one process)."""
    assert UNetTask.find_unused_parameters
    torch.manual_seed(0)
    args = unet_task_args(encoder="efficientnet-b0")
    model, task = build_unet(args[0]), UNetTask(*args)
    batch = {
        "image": torch.randn(2, 3, 64, 64), "target": torch.randint(0, 3, (2, 64, 64)), "type": torch.tensor([0, 2]),
    }
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trained = distributed.wrap(model, torch.device("cpu"), find_unused)
        task.train_step(trained, batch, torch.device("cpu"))["loss"].backward()
        if find_unused:
            task.train_step(trained, batch, torch.device("cpu"))["loss"].backward()
        else:
            with pytest.raises(RuntimeError, match="parameters that were not used"):
                task.train_step(trained, batch, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_open_tracker_on_other_ranks_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 gets a do-nothing tracker without contacting the store (rank 0 fails on this unreachable one)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with open_tracker(enabled=True, uri="http://127.0.0.1:1", experiment="cellseg-test", run_name="unet") as tracker:
        assert type(tracker) is Tracker
        tracker.start(params={"a": 1})
        assert tracker.run_id is None


def test_shard_sampler() -> None:
    """A world of 1 draws as torch's RandomSampler (so that training without torchrun is as before); a world of
    3 splits the same draw, less its last 10 % 3 indices, into 3 disjoint shards of 3."""

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    single = list(distributed.ShardSampler(20, 10, seeded()))
    assert single == list(torch.utils.data.RandomSampler(range(20), num_samples=10, generator=seeded()))
    everything = list(torch.utils.data.RandomSampler(range(20), generator=seeded()))
    assert list(distributed.ShardSampler(20, 20, seeded())) == everything
    shards = [list(distributed.ShardSampler(20, 10, seeded(), rank, 3)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    assert sorted(i for shard in shards for i in shard) == sorted(single[:9])
    assert shards[1] == single[1:9:3]


def test_shard_sampler_draws_more_than_the_data_set_in_whole_passes() -> None:
    """``samples_per_epoch`` above the data set's size: whole random permutations (each sample once per pass), then
    the start of one more; the first pass is the draw of ``samples_per_epoch`` = the size."""
    drawn = list(distributed.ShardSampler(6, 15, torch.Generator().manual_seed(3)))
    assert len(drawn) == 15
    assert sorted(drawn[:6]) == sorted(drawn[6:12]) == list(range(6)) and len(set(drawn[12:])) == 3
    assert drawn[:6] == list(distributed.ShardSampler(6, 6, torch.Generator().manual_seed(3)))
    assert drawn[6:12] != drawn[:6]  # a new order at each pass
    shards = [list(distributed.ShardSampler(6, 15, torch.Generator().manual_seed(3), rank, 2)) for rank in range(2)]
    assert [len(shard) for shard in shards] == [7, 7] and shards[0] == drawn[:14:2]
