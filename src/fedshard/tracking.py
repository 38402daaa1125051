"""The only module that talks to MLflow.

Runs are addressed by id through an MlflowClient, so that the launcher (which
owns the run's lifecycle) and the aggregator (which logs the rounds) can write
to the same run from different processes.
"""

from __future__ import annotations

import os
import shlex
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from .config import ExperimentConfig

# With a tracking server MLflow prints links to a run whenever one ends; they would interleave
# with the console output researchers know (set it to false to have them).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

DEFAULT_EXPERIMENT = "Default"
FAILURE_TAG = "fedshard.failure_reason"
WEIGHTS_DIR = "model"
WEIGHTS_FILE = "weights.pt"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI."""


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def ensure_store() -> str:
    """Open (and, for a new SQLite file, create) the store once, before any parallel work."""
    uri = tracking_uri()
    # Fail within seconds, before any run exists, instead of MLflow's minutes of retries.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        c = client()
        c.search_experiments(max_results=1)
        c.set_experiment_tag(experiment_id(DEFAULT_EXPERIMENT), "fedshard.store_check", "ok")  # a write: not locked
    except Exception as exc:  # MLflow raises many types for an unusable store
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot use the MLflow tracking store {uri}: {message}") from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


def experiment_id(name: str, create: bool = True) -> str | None:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name) if create else None


def start_run(cfg: ExperimentConfig, experiment_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run this experiment logs to: the one `mlflow run` made (MLFLOW_RUN_ID), or a new one."""
    c = client()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = c.get_run(run_id)
        if run.info.status != "RUNNING":
            raise TrackingError(f"MLFLOW_RUN_ID={run_id} is {run.info.status}, not RUNNING: refusing to log into it")
    else:
        name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        run_name = f"ws{cfg.world_size}-lr{cfg.params()['learning_rate']}-swap{cfg.params()['enable_swapping']}-r{cfg.rounds}-s{cfg.seed}"
        run_id = c.create_run(experiment_id(name), run_name=run_name, tags=tags or {}).info.run_id
    for k, v in {**(tags or {}), **owner_tags()}.items():
        c.set_tag(run_id, k, v)
    log_params(run_id, cfg)
    return run_id


HOST_TAG, PID_TAG = "fedshard.host", "fedshard.pid"


def owner_tags() -> dict[str, str]:
    """Which process is responsible for ending a run: lets a later sweep recognise a RUNNING
    run whose owner was killed outright (SIGKILL, OOM) as stale."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def log_params(run_id: str, cfg: ExperimentConfig) -> None:
    """Log every config field canonically. `mlflow run` has already logged its parameters as
    typed (MLflow forbids changing a param), so those are only checked to mean the same value."""
    c = client()
    existing = c.get_run(run_id).data.params
    ours = cfg.params()
    mismatched = []
    for name, value in existing.items():
        if name in ours and ExperimentConfig.from_mapping({name: _unquote(value)}).params()[name] != ours[name]:
            mismatched.append(f"{name}: logged {value!r}, running with {ours[name]!r}")
    # Swapping that does not apply is switched off by the config; that is no mismatch.
    mismatched = [m for m in mismatched if not (m.startswith("enable_swapping") and not cfg.swapping_applies)]
    if mismatched:
        raise TrackingError(f"run {run_id} already has different params: " + "; ".join(mismatched))
    missing = [Param(k, v) for k, v in ours.items() if k not in existing]
    if missing:
        c.log_batch(run_id, params=missing)


def _unquote(value: str) -> str:
    """`mlflow run` logs some values shell-quoted as they went into the command ('' for empty)."""
    if value[:1] in ("'", '"'):
        with suppress(ValueError):
            return "".join(shlex.split(value))
    return value


def log_round(run_id: str, step: int, metrics: dict[str, float]) -> None:
    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_weights(run_id: str, state: dict) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
        log_artifact(run_id, path, WEIGHTS_DIR)


def end_run(run_id: str, status: str, reason: str | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED, recording why when it did not finish."""
    c = client()
    if reason:
        c.set_tag(run_id, FAILURE_TAG, reason[:5000])
    c.set_terminated(run_id, status)


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


def resolve_weights(uri: str) -> Path:
    """A local weights file for `init_from`: a path, or an MLflow artifact URI (runs:/<id>/model)."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and not uri.startswith("runs:"):
        path = Path(urlparse(uri).path if scheme == "file" else uri).expanduser()
    else:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri()))
        except Exception as exc:
            raise FileNotFoundError(f"init_from={uri!r}: cannot download: {str(exc).splitlines()[0]}") from exc
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"init_from={uri!r}: no weights file at {path}")
    return path


__all__ = [
    "RunStatus", "TrackingError", "client", "end_run", "ensure_store", "log_artifact",
    "log_params", "log_round", "log_weights", "resolve_weights", "run_status", "start_run",
    "tracking_uri",
]


# --- sweeps and export ---------------------------------------------------------------
# Added for the grid (sweep.py) and the results pickle (export.py): a sweep is a
# parent run, each experiment its child run (tag mlflow.parentRunId), created by
# the sweep and then resumed by `fedshard run` through MLFLOW_RUN_ID.

from dataclasses import dataclass  # noqa: E402  (kept with the code that needs it)

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "fedshard.sweep"
_PAGE = 1000


@dataclass(frozen=True)
class RunRecord:
    """What sweeps and the exporter need to know about one run, detached from MLflow's types."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int
    params: dict
    tags: dict

    @property
    def is_experiment(self) -> bool:
        """An experiment run (not a sweep's parent run, nor any other run without a world_size)."""
        return "world_size" in self.params and self.tags.get(SWEEP_TAG) != "true"

    def config(self, only=None) -> ExperimentConfig:
        """The run's configuration, parsed from its params whatever their spelling ('0.00001' and
        '1e-05' are one learning rate); `only` restricts it to those params (others default).
        Raises ConfigError for params no config can have."""
        known = set(only or ExperimentConfig.__dataclass_fields__)
        return ExperimentConfig.from_mapping({k: _unquote(v) for k, v in self.params.items() if k in known})


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


def experiment_names() -> list[str]:
    return sorted(e.name for e in client().search_experiments())


def experiment_name_of_run(run_id: str) -> str:
    c = client()
    return c.get_experiment(c.get_run(run_id).info.experiment_id).name


def list_runs(experiment_name: str, status: str | None = None) -> list[RunRecord]:
    """Every active (not deleted) run of the experiment, optionally only those with `status`;
    an experiment that does not exist has none."""
    exp_id = experiment_id(experiment_name, create=False)
    if exp_id is None:
        return []
    c = client()
    query = f"attributes.status = '{status}'" if status else ""
    records, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=query, max_results=_PAGE, page_token=token,
                             order_by=["attributes.start_time ASC"])
        records += [RunRecord(r.info.run_id, r.info.experiment_id, r.info.status, r.info.start_time or 0,
                              dict(r.data.params), dict(r.data.tags)) for r in page]
        token = page.token
        if not token:
            return records


def start_sweep_run(experiment_name: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The sweep's parent run and its experiment id: the run `mlflow run -e sweep` made
    (MLFLOW_RUN_ID, which must be RUNNING), or a new one."""
    c = client()
    tags = {SWEEP_TAG: "true", **tags, **owner_tags()}
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = c.get_run(run_id)
        if run.info.status != "RUNNING":
            raise TrackingError(f"MLFLOW_RUN_ID={run_id} is {run.info.status}, not RUNNING: refusing to log into it")
        set_tags(run_id, tags)
        return run_id, run.info.experiment_id
    exp_id = experiment_id(experiment_name)
    return c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, exp_id


def create_child_run(cfg: ExperimentConfig, experiment_id: str, parent_run_id: str,
                     tags: dict[str, str] | None = None) -> str:
    """A RUNNING run for one experiment of a sweep, nested under the sweep's run, with every
    parameter already logged (so even an attempt that dies at once shows its configuration)."""
    p = cfg.params()
    name = f"ws{cfg.world_size}-lr{p['learning_rate']}-swap{p['enable_swapping']}-r{cfg.rounds}-s{cfg.seed}"
    run_id = client().create_run(experiment_id, run_name=name,
                                 tags={PARENT_TAG: parent_run_id, **(tags or {})}).info.run_id
    client().log_batch(run_id, params=[Param(k, v) for k, v in p.items()])
    return run_id


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def run_record(run_id: str) -> RunRecord:
    r = client().get_run(run_id)
    return RunRecord(r.info.run_id, r.info.experiment_id, r.info.status, r.info.start_time or 0,
                     dict(r.data.params), dict(r.data.tags))


def metric_history(run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) of every value logged for `key`, in logging order."""
    return [(m.step, m.value, m.timestamp) for m in client().get_metric_history(run_id, key)]
