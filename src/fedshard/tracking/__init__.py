"""fedshard's tracking: the only package that talks to MLflow.

Runs are addressed by id through an MlflowClient, so that the launcher (which owns the run's
lifecycle) and the aggregator (which logs the rounds) can write to the same run from different
processes. Callers import the package (`from fedshard import tracking`) and call `tracking.<name>`;
each job has its module:

- store: the tracking URI, the client, a SQLite store with its artifacts beside the database,
  the experiments (ids, names, description); TrackingError.
- runs: RunRecord; starting an experiment's run, a sweep's run and its child runs; params,
  tags, ending and reopening runs; reading them back (run_record, list_runs).
- owners: which process owns a RUNNING run (host, pid, start time) and whether it still runs.
- claims: which process trains a configuration: runs as claims, their heartbeat, and the hands a
  run changes by (resumed, reaped, ended), so that no two sweeps train one configuration.
- metrics: per-round metrics and their histories, copying them into an extension; system metrics.
- artifacts: files, folders, text and tables kept with a run.
- datasets: the data sets a run reads, as its dataset inputs.
- checkpoints: a round made durable (checkpoint, then metrics), the newest usable checkpoint,
  and the tags of resume and extension.
- logged_model: the final model as an MLflow model; weights to start from (init_from).
"""

import os

# With a tracking server MLflow prints links to a run whenever one ends; they would interleave
# with the console output researchers know (set it to false to have them).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# Nor progress bars for every artifact a run downloads (a checkpoint, a model to start from).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from fedshard.tracking import claims
from fedshard.tracking.artifacts import log_artifact, log_artifacts, log_table, log_text
from fedshard.tracking.checkpoints import (
    CHECKPOINT_TAG,
    EXTENDS_TAG,
    RESUMED_TAG,
    ROUNDS_TRAINED_TAG,
    CheckpointWriteError,
    checkpoint_rounds,
    commit_round,
    delete_checkpoints,
    load_checkpoint,
)
from fedshard.tracking.datasets import log_datasets
from fedshard.tracking.logged_model import INIT_FROM_RUN_TAG, load_final_weights, load_weights, log_model, source_run
from fedshard.tracking.metrics import (
    copy_round_metrics,
    latest,
    log_missing,
    log_round,
    logged_steps,
    metric_history,
    monitor_system,
)
from fedshard.tracking.owners import HOST_TAG, PID_TAG, host, owner_alive, owner_tags
from fedshard.tracking.runs import (
    FAILURE_TAG,
    RunRecord,
    create_child_run,
    end_run,
    list_runs,
    log_extra_params,
    record_precision,
    reopen_run,
    run_record,
    run_status,
    set_tags,
    start_run,
    start_sweep_run,
)
from fedshard.tracking.store import (
    NOTE_TAG,
    TrackingError,
    default_experiment_name,
    ensure_store,
    experiment_id,
    experiment_name_of_run,
    experiment_names,
    tracking_uri,
)

# What fedshard's other modules, its tests and benchmarks use, and the errors the package raises;
# anything else is reached through its module (tracking.runs.SWEEP_TAG).
__all__ = [
    "CHECKPOINT_TAG",
    "claims",
    "CheckpointWriteError",
    "EXTENDS_TAG",
    "FAILURE_TAG",
    "HOST_TAG",
    "INIT_FROM_RUN_TAG",
    "NOTE_TAG",
    "PID_TAG",
    "RESUMED_TAG",
    "ROUNDS_TRAINED_TAG",
    "RunRecord",
    "TrackingError",
    "checkpoint_rounds",
    "commit_round",
    "copy_round_metrics",
    "create_child_run",
    "default_experiment_name",
    "delete_checkpoints",
    "end_run",
    "ensure_store",
    "experiment_id",
    "experiment_name_of_run",
    "experiment_names",
    "host",
    "latest",
    "list_runs",
    "load_checkpoint",
    "load_final_weights",
    "load_weights",
    "log_artifact",
    "log_artifacts",
    "log_datasets",
    "log_extra_params",
    "log_missing",
    "log_model",
    "log_round",
    "log_table",
    "log_text",
    "logged_steps",
    "metric_history",
    "monitor_system",
    "owner_alive",
    "owner_tags",
    "record_precision",
    "reopen_run",
    "run_record",
    "run_status",
    "set_tags",
    "source_run",
    "start_run",
    "start_sweep_run",
    "tracking_uri",
]
