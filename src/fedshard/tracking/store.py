"""The MLflow store and its experiments: which store (the tracking URI), the client every call
goes through, a local SQLite store that keeps its artifacts beside the database, and the
experiments in it."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.tracking import MlflowClient

from fedshard.core.errors import FedshardError, described, first_line

if TYPE_CHECKING:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "Default"
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description in the UI
# Artifacts of a local SQLite store live beside the database file, in this folder.
ARTIFACTS_DIR = "mlartifacts"
EXPERIMENT_DESCRIPTION = (
    "fedshard experiments: AlexNet or ResNet-34 on CIFAR-100, trained federated by N trainers (tensor-parallel slices, "
    "optionally swapped, or FedAvg), evaluated by the aggregator every round. Each run is one experiment "
    "(metrics test_loss / test_accuracy per round, step = round); a sweep is a parent run with its "
    "experiments as children."
)
# Fail within seconds, before any run exists, instead of MLflow's minutes of retries.
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(FedshardError, RuntimeError):
    """The MLflow store cannot be used; the message names the URI."""


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def sqlite_artifact_root(uri: str | None = None) -> Path | None:
    """Where a local SQLite store's artifacts belong: `mlartifacts/` beside the database file
    (None for any other store, e.g. a tracking server, whose own settings apply)."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(urlparse(uri).path)).resolve().parent / ARTIFACTS_DIR


def _store_with_artifacts_beside_it(uri: str) -> SqlAlchemyStore:
    """The SQLite store, opened so that an experiment it creates gets `<root>/<experiment id>`
    as its artifact location rather than `./mlruns/<id>` of whatever directory this process is
    in (which makes two stores share, and collide in, one `mlruns/`)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = sqlite_artifact_root(uri)
    if root is None:
        raise ValueError(f"{uri} is no SQLite store")
    return SqlAlchemyStore(uri, root.as_uri())


@contextmanager
def _quick_failure():
    """MLflow's HTTP retries switched off for the duration, the caller's settings restored after."""
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_store() -> str:
    """Open (and, for a new SQLite file, create) the store once, before any parallel work."""
    uri = tracking_uri()
    with _quick_failure():
        try:
            root = sqlite_artifact_root(uri)
            if root is not None and not Path(unquote(urlparse(uri).path)).exists():
                _store_with_artifacts_beside_it(uri)  # a new store: its Default experiment beside it too
            c = client()
            c.search_experiments(max_results=1)
            c.set_experiment_tag(experiment_id(DEFAULT_EXPERIMENT), "fedshard.store_check", "ok")  # a write: not locked
        except Exception as exc:  # MLflow raises many types for an unusable store
            raise TrackingError(f"cannot use the MLflow tracking store {uri}: {first_line(exc)}") from exc
    return uri


@overload
def experiment_id(name: str, create: Literal[True] = ...) -> str: ...
@overload
def experiment_id(name: str, create: bool) -> str | None: ...
def experiment_id(name: str, create: bool = True) -> str | None:
    """The id of experiment `name`, created (with a description, and for a local SQLite store
    with its artifacts beside the database) when it does not exist yet and `create` is set."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    tags = {NOTE_TAG: EXPERIMENT_DESCRIPTION}
    try:
        if sqlite_artifact_root() is None:
            return c.create_experiment(name, tags=tags)
        from mlflow.entities import ExperimentTag

        return _store_with_artifacts_beside_it(tracking_uri()).create_experiment(
            name, tags=[ExperimentTag(k, v) for k, v in tags.items()]
        )
    except Exception as exc:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        log.debug(f"experiment {name!r} was created by another process at the same moment: {described(exc)}")
        return exp.experiment_id


def default_experiment_name(name: str | None = None) -> str:
    """The experiment meant: the one named, $MLFLOW_EXPERIMENT_NAME, $MLFLOW_EXPERIMENT_ID (set by
    `mlflow run`), or Default."""
    if name:
        return name
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if exp_id:
        exp = client().get_experiment(exp_id)
        if exp is not None:
            return exp.name
    return DEFAULT_EXPERIMENT


def experiment_meant(name: str | None = None) -> str:
    """The experiment this process works in: that of the run it logs to (MLFLOW_RUN_ID: `mlflow run`,
    a sweep's child), else the one named, as default_experiment_name says."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    return experiment_name_of_run(run_id) if run_id else default_experiment_name(name)


def experiment_names() -> list[str]:
    return sorted(e.name for e in client().search_experiments())


def experiment_name_of_run(run_id: str) -> str:
    c = client()
    return c.get_experiment(c.get_run(run_id).info.experiment_id).name
