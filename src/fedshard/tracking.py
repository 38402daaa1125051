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
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from .config import ExperimentConfig

# With a tracking server MLflow prints links to a run whenever one ends; they would interleave
# with the console output researchers know (set it to false to have them).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# Nor progress bars for every artifact a run downloads (a checkpoint, a model to start from).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_EXPERIMENT = "Default"
FAILURE_TAG = "fedshard.failure_reason"
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description in the UI
RUN_NAME_TAG = "mlflow.runName"  # setting it renames the run
MODEL_NAME = "model"  # the final model: runs:/<run id>/model
# Artifacts of a local SQLite store live beside the database file, in this folder.
ARTIFACTS_DIR = "mlartifacts"
EXPERIMENT_DESCRIPTION = (
    "fedshard experiments: AlexNet on CIFAR-100, trained federated by N trainers (tensor-parallel slices, "
    "optionally swapped, or FedAvg), evaluated by the aggregator every round. Each run is one experiment "
    "(metrics test_loss / test_accuracy per round, step = round); a sweep is a parent run with its "
    "experiments as children.")


class TrackingError(RuntimeError):
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


def _store_with_artifacts_beside_it(uri: str):
    """The SQLite store, opened so that an experiment it creates gets `<root>/<experiment id>`
    as its artifact location rather than `./mlruns/<id>` of whatever directory this process is
    in (which makes two stores share, and collide in, one `mlruns/`)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = sqlite_artifact_root(uri)
    return SqlAlchemyStore(uri, root.as_uri())


def ensure_store() -> str:
    """Open (and, for a new SQLite file, create) the store once, before any parallel work."""
    uri = tracking_uri()
    # Fail within seconds, before any run exists, instead of MLflow's minutes of retries.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        root = sqlite_artifact_root(uri)
        if root is not None and not Path(unquote(urlparse(uri).path)).exists():
            _store_with_artifacts_beside_it(uri)  # a new store: its Default experiment beside it too
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
            name, tags=[ExperimentTag(k, v) for k, v in tags.items()])
    except Exception:  # another process created it at the same moment: use that one
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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
        run_id = c.create_run(experiment_id(name), run_name=cfg.run_name(), tags=tags or {}).info.run_id
    existing = c.get_run(run_id).data.tags  # what `mlflow run` or a sweep recorded stays
    source = {k: v for k, v in source_tags().items() if k not in existing}
    # `mlflow run` names its run like languid-bear-729: in the UI's run table it is named by what it is.
    for k, v in {**(tags or {}), **owner_tags(), **source, NOTE_TAG: cfg.description(),
                 RUN_NAME_TAG: cfg.run_name()}.items():
        c.set_tag(run_id, k, v)
    log_params(run_id, cfg)
    return run_id


def source_tags() -> dict[str, str]:
    """What code made the run, as `mlflow run` records it: the fedshard checkout's git commit
    (when fedshard runs from one), and who ran it."""
    import getpass
    import subprocess

    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.type": "LOCAL", "mlflow.source.name": "fedshard"}
    checkout = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        with suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10)
            if done.returncode == 0:
                return done.stdout.strip()
        return ""

    top = git("rev-parse", "--show-toplevel")  # fedshard's own checkout, not a repository around an install
    if top and Path(top) == checkout:
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        tags["mlflow.source.name"] = str(checkout)
        if url := git("config", "--get", "remote.origin.url"):
            tags["mlflow.source.git.repoURL"] = url
    return tags


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


def log_extra_params(run_id: str, params: dict) -> None:
    """Params beyond the configuration's (a model's size, say): the same values may be logged again,
    as a resumed run does."""
    client().log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def log_round(run_id: str, step: int, metrics: dict[str, float]) -> None:
    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_model(run_id: str, weights: dict, example=None) -> None:
    """The final model as an MLflow model: `mlflow.pytorch.load_model("runs:/<id>/model")` gives
    fedshard's AlexNet, registrable with `mlflow.register_model`. Its signature: a float32 batch
    (N, 3, 32, 32) of CIFAR images normalised as in training (training.normalize) -> (N, 100)
    log-probabilities. fedshard's code travels with it, so loading needs no fedshard install."""
    import logging

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from .model import AlexNet

    with torch.device("meta"):
        model = AlexNet()
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}, assign=True)
    model.eval()
    x = np.asarray(example if example is not None else np.zeros((2, 3, 32, 32)), dtype=np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    # Created here, in the run's own experiment: left to itself, MLflow puts a model logged by run id
    # into the process's current experiment (Default), not the run's.
    # Pickled, not torch.export's pt2, so that load_model gives back the AlexNet class itself; MLflow
    # warns about pickle on every save, which is no news to whoever runs fedshard's own model.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    run = client().get_run(run_id)
    logged = client().create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                          params=dict(run.data.params))
    mlflow.pytorch.log_model(
        model, name=MODEL_NAME, model_id=logged.model_id, run_id=run_id, signature=infer_signature(x, y),
        serialization_format="pickle", code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"])


def end_run(run_id: str, status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED, recording why when it did not finish."""
    c = client()
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)
    if reason:
        c.set_tag(run_id, FAILURE_TAG, reason[:5000])
    c.set_terminated(run_id, status)


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


def load_weights(uri: str) -> dict:
    """The state dict that `init_from` names: a state-dict file (path or file: URI), or an MLflow
    model (runs:/<run id>/model, models:/<name>/<version>). Raises FileNotFoundError when there is
    nothing to load there, ValueError when what is there is no state dict."""
    import torch

    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_from={uri!r}: no weights file at {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"init_from={uri!r}: {path} is not a state dict: {_first_line(exc)}") from exc
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").state_dict()
    except Exception as exc:
        if uri.startswith("runs:/"):  # a run from before final models were MLflow models: model/weights.pt
            with suppress(Exception), tempfile.TemporaryDirectory() as tmp:
                legacy = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/weights.pt", dst_path=tmp,
                                                             tracking_uri=tracking_uri())
                return torch.load(legacy, map_location="cpu", weights_only=True)
        raise FileNotFoundError(f"init_from={uri!r}: cannot load it as an MLflow model: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "RunStatus", "TrackingError", "client", "end_run", "ensure_store", "log_artifact",
    "log_model", "log_params", "log_round", "load_weights", "run_status", "start_run",
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
    def checkpoint_round(self) -> int:
        """The round of the run's newest checkpoint, 0 when it has none."""
        with suppress(ValueError):
            return int(self.tags.get(CHECKPOINT_TAG) or 0)
        return 0

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


def start_sweep_run(experiment_name: str, run_name: str, tags: dict[str, str],
                    params: dict[str, str] | None = None) -> tuple[str, str]:
    """The sweep's parent run and its experiment id: the run `mlflow run -e sweep` made
    (MLFLOW_RUN_ID, which must be RUNNING), or a new one; `params` are logged on it."""
    c = client()
    tags = {SWEEP_TAG: "true", **tags, **owner_tags(), **source_tags()}
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = c.get_run(run_id)
        if run.info.status != "RUNNING":
            raise TrackingError(f"MLFLOW_RUN_ID={run_id} is {run.info.status}, not RUNNING: refusing to log into it")
        exp_id = run.info.experiment_id
        tags = {**tags, RUN_NAME_TAG: run_name}  # not the name `mlflow run -e sweep` made up
    else:
        exp_id = experiment_id(experiment_name)
        run_id = c.create_run(exp_id, run_name=run_name).info.run_id
    set_tags(run_id, tags)
    if params:
        c.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id, exp_id


def create_child_run(cfg: ExperimentConfig, experiment_id: str, parent_run_id: str,
                     tags: dict[str, str] | None = None) -> str:
    """A RUNNING run for one experiment of a sweep, nested under the sweep's run, with every
    parameter already logged (so even an attempt that dies at once shows its configuration)."""
    run_id = client().create_run(experiment_id, run_name=cfg.run_name(), tags={
        PARENT_TAG: parent_run_id, NOTE_TAG: cfg.description(), **source_tags(), **(tags or {})}).info.run_id
    client().log_batch(run_id, params=[Param(k, v) for k, v in cfg.params().items()])
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


# --- checkpoints, resume and extension -------------------------------------------------
# A run keeps the model of its latest round as the artifact checkpoint/round-<r>.pt
# (checkpoint.py), so that whatever stops it, it continues from there (`fedshard run
# --resume`); a longer run of the same configuration starts from a shorter one's final model
# with its rounds' metrics copied in (extension).

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_TAG = "fedshard.checkpoint_round"
RESUMED_TAG = "fedshard.resumed_from_round"
EXTENDS_TAG = "fedshard.extends"
ROUNDS_TRAINED_TAG = "fedshard.rounds_trained"
# What only the machine says, not the experiment: never copied from one run into another.
SYSTEM_PREFIX = "system/"


class CheckpointWriteError(OSError):
    """A round's checkpoint could not be stored; the run cannot promise to continue from it."""


def _artifacts(run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client().get_run(run_id).info.artifact_uri)


def commit_round(run_id: str, round_: int, metrics: dict[str, float], weights: dict | None = None) -> None:
    """Make round `round_` durable: its checkpoint first (when `weights` are given), then its
    metrics, then the older checkpoints go. A run whose metrics show round r therefore always
    has a checkpoint of round r or later, and a crash at any point leaves one that loads: the
    previous file is deleted only after the new one is complete (artifact stores publish a file
    only once it is whole; a torn file would fail checkpoint.load and the older one is used)."""
    from . import checkpoint

    if weights is not None:
        start = time.perf_counter()
        name = checkpoint.file_name(round_)
        with tempfile.TemporaryDirectory(prefix="fedshard-ckpt-") as tmp:
            try:
                path = checkpoint.save(checkpoint.Checkpoint(round_, weights, metrics), Path(tmp) / name)
                client().log_artifact(run_id, str(path), CHECKPOINT_DIR)
            except Exception as exc:
                with suppress(Exception):  # no torn file left for a later resume to trip over
                    _artifacts(run_id).delete_artifacts(f"{CHECKPOINT_DIR}/{name}")
                raise CheckpointWriteError(f"round {round_}: cannot store the checkpoint in the run's artifacts "
                                           f"({client().get_run(run_id).info.artifact_uri}): "
                                           f"{type(exc).__name__}: {exc}") from exc
        metrics = {**metrics, "checkpoint_seconds": time.perf_counter() - start}
    log_round(run_id, round_, metrics)
    if weights is not None:
        client().set_tag(run_id, CHECKPOINT_TAG, str(round_))
        delete_checkpoints(run_id, below=round_)


def checkpoint_rounds(run_id: str) -> list[int]:
    """Rounds of the run's checkpoint files, newest first."""
    from . import checkpoint

    rounds = (checkpoint.round_of(a.path) for a in client().list_artifacts(run_id, CHECKPOINT_DIR))
    return sorted((r for r in rounds if r is not None), reverse=True)


def load_checkpoint(run_id: str, warn=None):
    """The run's newest checkpoint that loads completely (a torn newer file is passed over, with a
    warning), or None when it has none."""
    from . import checkpoint

    for round_ in checkpoint_rounds(run_id):
        with tempfile.TemporaryDirectory(prefix="fedshard-ckpt-") as tmp:
            try:
                path = client().download_artifacts(run_id, f"{CHECKPOINT_DIR}/{checkpoint.file_name(round_)}", tmp)
                return checkpoint.load(path)
            except Exception as exc:
                if warn:
                    warn(f"run {run_id}: checkpoint of round {round_} is unusable ({exc}); trying an older one")
    return None


def delete_checkpoints(run_id: str, below: int | None = None) -> None:
    """Delete the checkpoint files of rounds before `below`; without it, every one (and the tag)."""
    from . import checkpoint

    repo = _artifacts(run_id)
    if below is None:
        repo.delete_artifacts(CHECKPOINT_DIR)
        with suppress(Exception):
            client().delete_tag(run_id, CHECKPOINT_TAG)
        return
    for round_ in checkpoint_rounds(run_id):
        if round_ < below:
            repo.delete_artifacts(f"{CHECKPOINT_DIR}/{checkpoint.file_name(round_)}")


def logged_steps(run_id: str, key: str = "test_accuracy") -> set[int]:
    return {m.step for m in client().get_metric_history(run_id, key)}


def log_missing(run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Log `metrics` at `step`, leaving out every key that already has a value there."""
    missing = {k: v for k, v in metrics.items() if step not in logged_steps(run_id, k)}
    if missing:
        log_round(run_id, step, missing)


def copy_round_metrics(source_id: str, run_id: str, up_to: int) -> None:
    """Copy every per-round metric of steps 0..up_to (values, steps and timestamps) from one run
    into another; system metrics stay with the run whose machine they describe."""
    c = client()
    keys = [k for k in c.get_run(source_id).data.metrics if not k.startswith(SYSTEM_PREFIX)]
    batch = [m for k in keys for m in c.get_metric_history(source_id, k) if m.step <= up_to]
    for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
        c.log_batch(run_id, metrics=batch[i:i + 1000])


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Set a FAILED, KILLED or stale run RUNNING again, owned by this process."""
    c = client()
    with suppress(Exception):
        c.delete_tag(run_id, FAILURE_TAG)
    for k, v in {**tags, **owner_tags()}.items():
        c.set_tag(run_id, k, v)
    c.update_run(run_id, status="RUNNING")


def load_final_weights(run_id: str) -> dict:
    """The final model of a FINISHED run, as a state dict."""
    return load_weights(f"runs:/{run_id}/{MODEL_NAME}")


def owner_alive(run: RunRecord) -> bool | None:
    """Whether the process that owns a RUNNING run still runs: True or False on this host, None
    when it lives on another host (or never said where)."""
    import socket

    if run.tags.get(HOST_TAG) != socket.gethostname():
        return None
    pid = int(run.tags.get(PID_TAG) or 0)
    return bool(pid) and _is_fedshard_process(pid)


def _is_fedshard_process(pid: int) -> bool:
    """Alive, and still one of ours (not a new process that reuses the pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and any("fedshard" in a or "sweep" in a for a in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


# --- what a run reads and what its machine did ------------------------------------------

SYSTEM_METRICS_INTERVAL = 5.0  # seconds; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides


def log_datasets(run_id: str, inputs) -> None:
    """Record the data sets an experiment reads (data.DatasetInput) as the run's dataset inputs:
    name, digest, source file, number of images, and its context (training / evaluation)."""
    import json

    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    schema = json.dumps(TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, 32, 32), "images")]),
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "fine_labels")])).to_dict())
    datasets = [DatasetInput(Dataset(i.name, i.digest, "local", json.dumps({"uri": i.source}), schema,
                                     json.dumps(i.profile)), [InputTag("mlflow.data.context", i.context)])
                for i in inputs]
    # Experiments started together record the same data sets: both may find one missing and insert
    # it, and the store refuses the second insert. Once the first is in, a second try finds it.
    for attempt in range(3):
        try:
            client().log_inputs(run_id, datasets=datasets)
            return
        except Exception:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def monitor_system(run_id: str):
    """Sample this machine's CPU, memory, disk and network (and GPUs, with `fedshard[gpu]`) into the
    run's system/ metrics with MLflow's own monitor, until .finish(); a resumed run continues its
    steps. The launcher runs it, so it covers all of an experiment's local processes."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=True,
                                   tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_table(run_id: str, frame, artifact_file: str) -> None:
    """A pandas DataFrame as an MLflow table (shown in the UI's artifact view and evaluation tab)."""
    client().log_table(run_id, frame, artifact_file)


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, str(local_dir), artifact_path)


def latest(run_id: str, key: str = "test_accuracy") -> tuple[int, float] | None:
    """(step, value) of the highest step logged for `key`, or None before the first."""
    history = client().get_metric_history(run_id, key)
    return max(((m.step, m.value) for m in history), default=None)
