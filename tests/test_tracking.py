"""cellseg.tracking against a real sqlite MLflow store in a temporary directory (one per module:
creating an MLflow database takes seconds), a disabled tracker and unreachable servers."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cellseg.errors import ParamsError, ResourceError
from cellseg.tracking import (
    DatasetInput,
    Tracker,
    check_server,
    content_digest,
    dataset_input,
    dvc_experiment_name,
    flatten_params,
    git_commit,
    open_tracker,
    run_name,
    run_record,
    tracking_uri,
    training_tracker,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.fixture
def in_store(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = the module's store directory, MLFLOW_TRACKING_URI unset (restored afterwards:
    mlflow.set_tracking_uri exports it)."""
    monkeypatch.chdir(store_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return store_dir


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_params() -> None:
    nested = {"unet": {"encoder": "resnet34", "depth": 5, "channels": [16, 32]}, "lr": 1e-3,
              "amp": True, "limit": None}
    assert flatten_params(nested) == {
        "unet.encoder": "resnet34", "unet.depth": 5, "unet.channels": "16,32",
        "lr": 1e-3, "amp": True, "limit": "null",
    }
    assert flatten_params({"a": {"b": 1}}, prefix="train") == {"train.a.b": 1}


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(None) == "http://example:5000"
    assert tracking_uri("sqlite:///runs/t.db") == f"sqlite:///{tmp_path}/runs/t.db"
    assert tracking_uri("sqlite:////abs/t.db") == "sqlite:////abs/t.db"


def test_runs_of_a_dvc_temporary_copy_go_to_the_project_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dvc exp run --temp`` / queued experiments run in ``<project>/.dvc/tmp/exps/<tmp>``: the default store,
    and a new experiment's artifacts, are the project's, not the copy's (deleted when the run ends)."""
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / "stages").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy / "stages")
    assert tracking_uri(None) == f"sqlite:///{project}/mlflow.db"
    assert tracking_uri("sqlite:///runs/t.db") == f"sqlite:///{project}/runs/t.db"
    note = copy / "note.txt"
    note.write_text("kept")
    monkeypatch.chdir(copy)
    with open_tracker(enabled=True, uri=None, experiment="temp copy", run_name="t") as tracker:
        tracker.start(params={"a": 1}, tags={})
        tracker.log_artifact(note, artifact_path="notes")
    assert (project / "mlflow.db").is_file() and not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()
    assert [p.read_text() for p in (project / "mlruns" / "temp_copy").rglob("note.txt")] == ["kept"]
    monkeypatch.chdir(project)  # the project itself sees that run
    assert len(_client().search_runs([_client().get_experiment_by_name("temp copy").experiment_id])) == 1


def test_git_and_dvc_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_commit(tmp_path) is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_commit(tmp_path) is None  # no commit yet
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    sha = git_commit(tmp_path)
    assert sha is not None and len(sha) == 40
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert dvc_experiment_name() is None
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-newt")
    assert dvc_experiment_name() == "lucid-newt"


def test_full_run_round_trip(in_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # load_model's
    plot = in_store / "curve.txt"
    plot.write_text("loss\n")
    model = torch.nn.Linear(3, 2)
    params = flatten_params({"train": {"lr": 0.01, "epochs": 3}, "model": {"arch": "unet"}})
    with open_tracker(enabled=True, uri=None, experiment="roundtrip", run_name="unet") as tracker:
        tracker.start(params=params, tags={"model": "unet", "git_commit": "abc123", "dvc_exp": None})
        for step in range(3):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "val/iou": 0.1 * step}, step=step)
        tracker.log_artifact(plot, artifact_path="plots")
        t0 = time.perf_counter()
        model_uri = tracker.log_model(model, name="model")
        assert time.perf_counter() - t0 < 10
        run_id = tracker.run_id
    assert run_id is not None and model_uri is not None
    assert (in_store / "mlflow.db").is_file()

    client = _client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "roundtrip"
    assert run.data.params == {"train.lr": "0.01", "train.epochs": "3", "model.arch": "unet"}
    tags = run.data.tags
    assert tags["mlflow.runName"] == "unet" and tags["model"] == "unet"
    assert tags["git_commit"] == "abc123" and "dvc_exp" not in tags
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert len(client.get_metric_history(run_id, "val/iou")) == 3
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/curve.txt"]

    x = torch.randn(4, 3)
    for uri in (f"runs:/{run_id}/model", model_uri):
        loaded = mlflow.pytorch.load_model(uri)
        assert torch.equal(loaded(x), model(x))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _dvc_dir_md5(root: Path) -> str:
    """DVC's directory hash, computed here from its definition: the md5 of the JSON list of every file's md5
    and POSIX relative path (sorted by path, keys sorted), plus ".dir"."""
    entries = [
        {"md5": _md5(p.read_bytes()), "relpath": p.relative_to(root).as_posix()} for p in root.rglob("*") if p.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode("utf-8")
    return _md5(listing) + ".dir"


def test_content_digest_is_dvcs_md5(tmp_path: Path) -> None:
    """A file: the md5 of its bytes (DVC 3 hashes text as is: no CRLF normalisation); a directory: DVC's
    ``<md5>.dir``, which changes with any file's content or name."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_bytes(b"id,annotation\r\na,1 2\r\n")
    (data / "train" / "a.png").write_bytes(bytes(range(256)))
    assert content_digest(data / "train.csv") == _md5(b"id,annotation\r\na,1 2\r\n")
    digest = content_digest(data)
    assert digest == _dvc_dir_md5(data) and digest.endswith(".dir") and len(digest) == 36
    assert content_digest(str(data)) == digest  # the same for a str path
    (data / "train" / "a.png").write_bytes(bytes(range(255)))
    changed = content_digest(data)
    assert changed != digest and changed == _dvc_dir_md5(data)
    (data / "train" / "a.png").rename(data / "train" / "b.png")
    assert content_digest(data) not in (digest, changed)


def test_run_name() -> None:
    assert run_name("unet", "kaggle", "exp-x") == "unet · kaggle · exp-x"
    assert run_name("maskrcnn", "synthetic") == run_name("maskrcnn", "synthetic", None) == "maskrcnn · synthetic"


def test_dataset_input(tmp_path: Path) -> None:
    root = tmp_path / "sartorius"
    root.mkdir()
    (root / "train.csv").write_text("id\n")
    data = dataset_input("kaggle", root, root / "train.csv", "validation", limit_images=12)
    assert data == DatasetInput(
        name="kaggle:sartorius[12 images]", source=str(root), digest=_md5(b"id\n"), context="validation",
        tags={"data.source": "kaggle", "data.root": str(root), "file": str(root / "train.csv")},
    )
    whole = dataset_input("kaggle", root, root)
    assert (whole.name, whole.context, whole.digest) == ("kaggle:sartorius", "training", _dvc_dir_md5(root))


def test_run_record_carries_the_data_source_and_inputs(tmp_path: Path) -> None:
    inputs = [DatasetInput("kaggle:x", str(tmp_path), "0" * 32)]
    params = {"data": {"source": "kaggle"}, "train": {"unet": {"resume": True, "lr": 0.1}}}
    record = run_record(params, "unet", inputs, tmp_path)
    assert record["run_params"] == {"data.source": "kaggle", "train.unet.lr": 0.1}
    assert record["run_tags"]["data_source"] == "kaggle" and record["run_tags"]["model"] == "unet"
    assert record["run_inputs"] == inputs
    bare = run_record({}, "maskrcnn", repo_dir=tmp_path)
    assert bare["run_tags"]["data_source"] is None and bare["run_inputs"] == []


def test_run_logs_its_name_and_data_inputs(in_store: Path) -> None:
    """Each input is a dataset of the run (``mlflow.log_input``): name, DVC digest, source, context tag."""
    data = in_store / "kaggle_data"
    data.mkdir()
    (data / "train.csv").write_text("id,annotation\n")
    (data / "decoded").mkdir()
    (data / "decoded" / "images.parquet").write_bytes(b"parquet")
    inputs = [
        dataset_input("kaggle", data, data / "train.csv", "training"),
        dataset_input("kaggle", data, data / "decoded", "validation", limit_images=5),
    ]
    name = run_name("unet", "kaggle", "exp-x")
    with open_tracker(enabled=True, uri=None, experiment="inputs", run_name=name) as tracker:
        tracker.start(params={"a": 1}, tags={}, inputs=inputs)
        run_id = tracker.run_id
    run = _client().get_run(run_id)
    assert run.info.run_name == name
    logged = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(logged) == ["kaggle:kaggle_data", "kaggle:kaggle_data[5 images]"]
    for expected in inputs:
        found = logged[expected.name]
        tags = {t.key: t.value for t in found.tags}
        assert found.dataset.digest == expected.digest
        assert tags["mlflow.data.context"] == expected.context and tags["file"] == expected.tags["file"]
        assert str(data) in found.dataset.source
    assert logged["kaggle:kaggle_data[5 images]"].dataset.digest == _dvc_dir_md5(data / "decoded")


def test_exception_marks_run_failed_and_interrupt_killed(in_store: Path) -> None:
    ids = []
    for exc, status in ((ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(exc)):
            with open_tracker(enabled=True, uri=None, experiment="failing", run_name="unet") as tracker:
                tracker.start(params={"a": 1})
                tracker.log_metrics({"train/loss": 1.0}, step=0)
                ids.append(tracker.run_id)
                raise exc
        assert _client().get_run(ids[-1]).info.status == status


def test_resume_continues_the_run(in_store: Path) -> None:
    params = {"train.lr": 0.01}
    with open_tracker(enabled=True, uri=None, experiment="resume", run_name="unet") as first:
        first.start(params=params)
        first.log_metrics({"val/iou": 0.1}, step=0)
    with open_tracker(enabled=True, uri=None, experiment="resume", run_name="unet") as second:
        second.start(params={**params, "train.resumed": True}, run_id=first.run_id)
        second.log_metrics({"val/iou": 0.2}, step=1)
    assert second.run_id == first.run_id
    client = _client()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.01", "train.resumed": "True"}
    assert [m.step for m in client.get_metric_history(first.run_id, "val/iou")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    with pytest.raises(ParamsError, match="train.lr"):
        open_tracker(enabled=True, uri=None, experiment="resume").start(params={"train.lr": 0.1}, run_id=first.run_id)
    with pytest.raises(ResourceError, match="cannot resume"):
        open_tracker(enabled=True, uri=None, experiment="resume").start(params=params, run_id="0" * 32)


def test_disabled_tracker_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plot.png").write_bytes(b"png")
    before = sorted(tmp_path.rglob("*"))
    with open_tracker(enabled=False, uri="http://127.0.0.1:1", experiment="cellseg-test", run_name="unet") as tracker:
        assert type(tracker) is Tracker
        tracker.start(params={"a": 1}, tags={"model": "unet"}, run_id=None)
        tracker.log_metrics({"train/loss": 0.3}, step=0)
        tracker.log_artifact(tmp_path / "plot.png", artifact_path="plots")
        assert tracker.log_model(torch.nn.Linear(1, 1), name="model") is None
        assert tracker.run_id is None
    assert sorted(tmp_path.rglob("*")) == before


def test_unreachable_server_fails_fast_at_open() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match="unreachable") as err:
        open_tracker(enabled=True, uri=uri, experiment="cellseg-test")
    assert time.perf_counter() - t0 < 10
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


@pytest.fixture
def http_status_server() -> Iterator[tuple[str, list[int]]]:
    """A loopback HTTP server that answers every GET with the status code at the end of the list."""
    codes = [503]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes[-1])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", codes
    finally:
        server.shutdown()
        server.server_close()


def test_check_server_status_codes(http_status_server: tuple[str, list[int]]) -> None:
    uri, codes = http_status_server
    with pytest.raises(ResourceError, match="HTTP 503"):
        check_server(uri, "cellseg")
    for code in (200, 401, 404):  # the server answers: MLflow reports the details itself
        codes.append(code)
        check_server(uri, "cellseg")


def test_training_tracker_names_the_run_and_lists_its_inputs(in_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What both training stages open: a run named for the model, data source and DVC experiment, whose
    Dataset column lists each input (the decode stage's folder, the split file) with its DVC digest; with
    tracking off, nothing."""
    from helpers.project import project_params

    root = in_store / "sartorius"
    (root / "decoded").mkdir(parents=True)
    (root / "decoded" / "images.parquet").write_bytes(b"tables")
    (root / "split.json").write_text("{}")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-7")
    data = project_params("data", source="kaggle", root=str(root), limit_images=5)
    tracking = project_params("tracking", enabled=True, uri=None, experiment="stages")
    inputs = [(root / "decoded", "training"), (root / "split.json", "split")]
    tracker, datasets = training_tracker(tracking, data, "maskrcnn", inputs)
    assert [d.context for d in datasets] == ["training", "split"]
    with tracker:
        tracker.start(params={}, inputs=datasets)
        run_id = tracker.run_id
    run = _client().get_run(run_id)
    assert run.info.run_name == "maskrcnn · kaggle · exp-7"
    logged = sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs)
    expected = [("kaggle:sartorius[5 images]", _dvc_dir_md5(root / "decoded")), ("kaggle:sartorius[5 images]", _md5(b"{}"))]
    assert logged == sorted(expected)
    off = project_params("tracking", enabled=False, uri=None, experiment="x")
    off_tracker, none = training_tracker(off, data, "unet", [(root, "training")])
    assert type(off_tracker) is Tracker and none == []
