"""Training tracked by a real ``mlflow server`` on loopback (sqlite backend, artifacts proxied by the server),
read back through its REST API; and an unreachable server refused before any training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cellseg.checkpoint import load_checkpoint
from cellseg.errors import ResourceError
from cellseg.models.unet import UNetTask
from cellseg.tracking import open_tracker, run_record
from cellseg.train import TrainingRun, train_tracked
from helpers.fit_job import TinyNet, config, datasets, make_data, new_model, unet_task_args

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, endpoint: str, **query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; its URL. Clients upload artifacts through it
    (``--serve-artifacts``: runs get ``mlflow-artifacts:/`` roots stored under ``--artifacts-destination``)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    url = f"http://127.0.0.1:{free_port()}"
    log = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
    ]
    with open(log, "w") as out:  # own session: the server's workers are stopped with it
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty cwd and no tracking URI or DVC experiment from the environment (restored afterwards)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.mark.slow  # ~15-40 s: the server's start (database migrations) and the model upload
def test_tracked_training_through_a_server(server: str, tmp_path: Path, client_env: None, one_thread: None) -> None:
    import mlflow.pytorch

    sets = datasets(make_data(tmp_path / "data"))
    cfg = config(epochs=2)
    record = run_record({"train": {"unet": cfg.model_dump()}, "unet": {"encoder": "tiny"}}, "unet", repo_dir=REPO)
    run = TrainingRun(
        tmp_path / "models", tmp_path / "metrics",
        open_tracker(enabled=True, uri=server, experiment="server-test", run_name="unet"),
        {"model_params": {"encoder": "tiny"}}, record["run_params"], record["run_tags"],
    )
    summary = train_tracked(new_model(), UNetTask(*unet_task_args()), *sets, cfg, run)
    run_id = summary["mlflow_run_id"]
    history = load_checkpoint(tmp_path / "models" / "last.pt", "unet")["history"]

    run = get_json(server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {k: str(v) for k, v in record["run_params"].items()}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.runName"] == "unet" and tags["model"] == "unet"
    assert tags.get("git_commit") == record["run_tags"]["git_commit"] and "dvc_experiment" not in tags

    for key in ("train/loss", "val/loss", "val/iou", "val/dice", "lr"):
        metrics = get_json(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        assert [(m["step"], m["value"]) for m in metrics] == [(r["epoch"], pytest.approx(r[key])) for r in history]

    def listed(path: str) -> dict[str, bool]:
        return {f["path"]: f["is_dir"] for f in get_json(server, "artifacts/list", run_id=run_id, path=path)["files"]}

    assert listed("") == {"plots": True, "metrics": True, "checkpoints": True}  # MLflow 3: models live apart
    assert listed("plots") == {"plots/curves.png": False} and listed("metrics") == {"metrics/epochs.csv": False}
    assert listed("checkpoints") == {"checkpoints/best.pt": False}
    assert summary["best_epoch"] == int(np.argmax([r["val/map"] for r in history])) + 1

    mlflow.set_tracking_uri(server)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    expected = TinyNet()
    expected.load_state_dict(load_checkpoint(tmp_path / "models" / "best.pt", "unet")["model_state"])
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)


def test_unreachable_server_fails_before_training(tmp_path: Path, client_env: None) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    began = time.perf_counter()
    with pytest.raises(ResourceError, match="unreachable"):
        open_tracker(enabled=True, uri=uri, experiment="server-test", run_name="unet")
    assert time.perf_counter() - began < 10
    assert list(tmp_path.iterdir()) == []
