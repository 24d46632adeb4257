"""Experiment tracking with MLflow: the only module of cellseg that imports mlflow.

Usage (the trainer)::

    with open_tracker(enabled=True, uri=None, experiment="cellseg", run_name="unet") as tracker:
        tracker.start(params=flatten_params(cfg), tags={"model": "unet", "git_commit": git_commit(".")})
        tracker.log_metrics({"train/loss": 0.3, "val/iou": 0.5}, step=epoch)
        tracker.log_artifact("plots/curves.png", artifact_path="plots")
        tracker.log_model(model, name="model")  # mlflow.pytorch.load_model(f"runs:/{run_id}/model")

Leaving the ``with`` block ends the run: FINISHED, FAILED on an exception, KILLED on Ctrl-C.
``open_tracker(enabled=False, ...)`` returns a ``Tracker`` whose methods do nothing, and so does ``open_tracker`` in
every process but rank 0 of a ``torchrun`` launch (:mod:`cellseg.distributed`): one run per training.

Tracking URI: the ``uri`` argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
That default is MLflow 3's own (``mlflow.store.tracking.DEFAULT_TRACKING_URI``): ``mlflow ui`` run
from the project root with no flags opens ``./mlflow.db`` (it falls back to ``./mlruns`` only when
that holds a legacy file store, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``).
Artifacts and models of that store go to ``./mlruns/<experiment id>/``. A relative sqlite path is
made absolute against the current directory (the project root under DVC) when the tracker opens, or, in the
temporary copy where ``dvc exp run --temp`` and queued experiments run, against the project itself
(:func:`project_dir`): their runs and artifacts go to the project's store.

An http(s) server is probed (5 s) when the tracker opens, so an unreachable one fails with a
``ResourceError`` before any training. MLflow's INFO log lines are silenced unless
``MLFLOW_LOGGING_LEVEL`` is set, and its "View run at <url>" stdout lines unless
``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=false``.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cellseg.errors import ParamsError, ResourceError, cut

if TYPE_CHECKING:
    import torch

ParamValue = str | int | float | bool

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PROBE_TIMEOUT_S = 5.0

_log = logging.getLogger(__name__)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, ParamValue]:
    """Flatten nested params to dotted keys ("unet.encoder"); lists become "a,b", None "null"."""
    flat: dict[str, ParamValue] = {}
    for key, value in nested.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def git_commit(repo_dir: str | Path = ".") -> str | None:
    """The HEAD commit of the git repository at ``repo_dir``, or None (no git, no repo, no commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "HEAD"],
            cwd=repo_dir, capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def dvc_experiment_name() -> str | None:
    """The DVC experiment name: ``dvc exp run`` (DVC 3) sets ``DVC_EXP_NAME`` for its stages."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_name(model: str, data_source: str, experiment: str | None = None) -> str:
    """A run's name in ``mlflow ui``: the model, the data source and the DVC experiment (when there is one),
    e.g. ``unet · kaggle · exp-3f1a2``, so that runs on real and on synthetic images are told apart."""
    return " · ".join(part for part in (model, data_source, experiment) if part)


@dataclass(frozen=True)
class DatasetInput:
    """A data set a run trained or validated on, as MLflow's Dataset column shows it (``mlflow.log_input``).

    ``digest`` is DVC's hash of the data the stage read (:func:`content_digest`); ``source`` where it came from.
    """

    name: str
    source: str
    digest: str
    context: str = "training"
    tags: Mapping[str, str] = field(default_factory=dict)


def dataset_input(
    source: str, root: str | Path, path: str | Path, context: str = "training", limit_images: int | None = None
) -> DatasetInput:
    """The :class:`DatasetInput` of the data at ``path`` (a stage's input), made from data source ``source``
    at ``root``: named ``<source>:<root's name>`` (plus ``[N images]`` for a subset), with DVC's hash of ``path``."""
    name = f"{source}:{Path(root).resolve().name}" + (f"[{limit_images} images]" if limit_images else "")
    tags = {"data.source": source, "data.root": str(root), "file": str(path)}
    return DatasetInput(name, str(Path(root).resolve()), content_digest(path), context, tags)


def content_digest(path: str | Path) -> str:
    """DVC's md5 of a file or a directory, as ``dvc.lock`` records it (``<md5>.dir`` for a directory)."""
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(Path(path).resolve()), fs, "md5", dry_run=True)
    return obj.hash_info.value


def project_dir() -> Path:
    """Where relative store paths point: the current directory, or, inside the temporary copy of the project
    in which ``dvc exp run --temp`` and queued experiments run (``<project>/.dvc/tmp/exps/<tmp>/...``), the
    project itself, so that their runs land in the project's store instead of vanishing with the copy."""
    here = Path.cwd()
    parts = here.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    A relative sqlite path is made absolute against :func:`project_dir`.
    """
    resolved = (uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    prefix = "sqlite:///"
    if resolved.startswith(prefix) and not resolved.startswith(prefix + "/"):
        resolved = prefix + str(project_dir() / resolved[len(prefix) :])
    return resolved


def check_server(uri: str, experiment: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ResourceError unless the http(s) tracking server at ``uri`` answers within ``timeout``.

    Any HTTP answer below 500 (even 401/404) or a TLS certificate complaint counts as an answer:
    MLflow itself then reports credentials and TLS problems, quickly and precisely.
    """
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return
        reason = str(e.reason)
    except ssl.SSLError:
        return
    except OSError as e:  # timeouts and resets while reading the answer
        reason = str(e) or type(e).__name__
    raise ResourceError(
        f"MLflow tracking server {uri} is unreachable ({reason}); "
        "start it or set tracking.enabled: false / MLFLOW_TRACKING_URI"
    )


class Tracker:
    """The tracker interface; this base class does nothing (``open_tracker(enabled=False, ...)``)."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once started, else None."""
        return None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End the run: FINISHED, FAILED on an exception, KILLED on KeyboardInterrupt."""

    def start(
        self,
        params: Mapping[str, ParamValue],
        tags: Mapping[str, str | None] | None = None,
        run_id: str | None = None,
        inputs: Sequence[DatasetInput] = (),
    ) -> None:
        """Start a run (or resume run ``run_id``), log ``params``, ``tags`` (None values dropped) and the
        data sets it reads (``inputs``)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at ``step``; names may contain "/"."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a directory's contents under ``artifact_path``."""

    def log_model(self, model: torch.nn.Module, name: str = "model") -> str | None:
        """Log a torch module (``mlflow.pytorch.load_model(f"runs:/{run_id}/{name}")``); its URI."""
        return None


class MlflowTracker(Tracker):
    """A tracker that logs one MLflow run to ``uri``, in ``experiment_id``."""

    def __init__(self, uri: str, experiment_id: str, run_name: str | None) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_name = run_name
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._run_id is None:
            return
        import mlflow

        status = "FINISHED" if exc_type is None else "FAILED"
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        try:
            mlflow.end_run(status=status)
        except Exception:
            if exc_type is None:
                raise
            _log.warning("could not end MLflow run %s", self._run_id, exc_info=True)

    def start(
        self,
        params: Mapping[str, ParamValue],
        tags: Mapping[str, str | None] | None = None,
        run_id: str | None = None,
        inputs: Sequence[DatasetInput] = (),
    ) -> None:
        import mlflow

        if self._run_id is not None:
            raise RuntimeError(f"MLflow run {self._run_id} already started")
        run_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if self.run_name:
            run_tags["mlflow.runName"] = self.run_name
        if run_id is not None:
            self._check_resumable(run_id, params)
        mlflow.set_tracking_uri(self.uri)
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else self.experiment_id,
            run_name=self.run_name,
            tags=run_tags,
        )
        self._run_id = run.info.run_id
        if params:
            mlflow.log_params(dict(params))
        for dataset in inputs:
            mlflow.log_input(_meta_dataset(dataset), context=dataset.context, tags=dict(dataset.tags) or None)

    def _check_resumable(self, run_id: str, params: Mapping[str, ParamValue]) -> None:
        """Raise unless run ``run_id`` exists and its logged params agree with ``params``."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            logged = MlflowClient(self.uri).get_run(run_id).data.params
        except MlflowException as e:
            raise ResourceError(f"cannot resume MLflow run {run_id} at {self.uri}: {e.message}") from e
        changed = sorted(k for k, v in params.items() if logged.get(k, str(v)) != str(v))
        if changed:
            raise ParamsError(
                f"cannot resume MLflow run {run_id}: params changed since it was logged: "
                f"{', '.join(changed)}; start a new run instead"
            )

    def _require_run(self) -> None:
        if self._run_id is None:
            raise RuntimeError("call Tracker.start() before logging")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        self._require_run()
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        self._require_run()
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, model: torch.nn.Module, name: str = "model") -> str | None:
        """Log with pickle serialisation (no input example needed) and fixed pip requirements
        (MLflow's requirement inference reloads the model in a subprocess: slow)."""
        import mlflow.pytorch

        self._require_run()
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle-vs-pt2 advice on every call
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        finally:
            quiet.setLevel(level)
        return info.model_uri


def training_tracker(
    tracking: Any, data: Any, model: str, inputs: Sequence[tuple[str | Path, str]]
) -> tuple[Tracker, list[DatasetInput]]:
    """The tracker of one training stage's run, named by :func:`run_name`, and the :class:`DatasetInput` of each
    ``(path, context)`` in ``inputs``; ``tracking`` and ``data`` are those params sections."""
    name = run_name(model, data.source, dvc_experiment_name())
    tracker = open_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_name=name)
    if not tracking.enabled:
        return tracker, []
    return tracker, [dataset_input(data.source, data.root, path, context, data.limit_images) for path, context in inputs]


def _meta_dataset(dataset: DatasetInput):  # -> mlflow.data.meta_dataset.MetaDataset
    """MLflow's form of a :class:`DatasetInput`: its name, digest and (local or remote) source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two registered source kinds: the same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset.source)
    return MetaDataset(source=source, name=dataset.name, digest=dataset.digest)


def open_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None) -> Tracker:
    """Open the tracking store (see the module docstring) and get or create ``experiment``.

    Raises ResourceError if the server or store cannot be reached; ``enabled=False``, or a process other than
    rank 0 under ``torchrun``, gives a do-nothing ``Tracker`` and touches nothing.
    """
    # Imported here: cellseg.distributed imports torch, which the rest of this module does not need.
    from cellseg.distributed import is_main

    if not enabled or not is_main():
        return Tracker()
    resolved = tracking_uri(uri)
    if urllib.parse.urlparse(resolved).scheme in ("http", "https"):
        check_server(resolved, experiment)
    from mlflow import MlflowClient  # configures mlflow's loggers on first import

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # else end_run prints

    try:
        client = MlflowClient(resolved)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, _artifacts(experiment))
    except Exception as e:  # backends raise MlflowException, OSError, SQLAlchemy errors...
        detail = cut((str(e).strip().splitlines() or [""])[0], 200)  # MLflow's texts run to a page
        raise ResourceError(
            f"MLflow tracking store {resolved} cannot be opened ({type(e).__name__}: {detail}); "
            "fix it or set tracking.enabled: false / MLFLOW_TRACKING_URI"
        ) from e
    if found is not None and found.lifecycle_stage == "deleted":
        raise ResourceError(
            f"MLflow experiment {experiment!r} at {resolved} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment_id}) or choose another name"
        )
    return MlflowTracker(resolved, experiment_id, run_name)


def _artifacts(experiment: str) -> str | None:
    """A new experiment's artifact location: MLflow's default (``./mlruns/<id>``), except in a DVC temporary
    copy of the project (see :func:`project_dir`), where it is the project's ``mlruns/<experiment>``."""
    root = project_dir()
    if root == Path.cwd():
        return None
    return (root / "mlruns" / re.sub(r"[^A-Za-z0-9._-]", "_", experiment)).as_uri()


def run_record(
    params: Mapping[str, Any], model: str, inputs: Sequence[DatasetInput] = (), repo_dir: str | Path = "."
) -> dict[str, Any]:
    """The ``run_params``, ``run_tags`` and ``run_inputs`` of a training run: all params flattened (except the
    run-control ``resume`` flags, so that a resumed run keeps its params), the model, git commit, data source
    and DVC experiment name, and the data sets it reads."""
    flat = flatten_params(params)
    tags = {
        "model": model,
        "git_commit": git_commit(repo_dir),
        "dvc_experiment": dvc_experiment_name(),
        "data_source": str(flat.get("data.source", "")) or None,
    }
    return {
        "run_params": {k: v for k, v in flat.items() if not k.endswith(".resume")},
        "run_tags": tags,
        "run_inputs": list(inputs),
    }
