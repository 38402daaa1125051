"""A run's metrics: the per-round ones (step = round) the aggregator logs and sweeps, resume and
extension read back, and the system/ metrics of the machine the run ran on."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mlflow.entities import Metric

from fedshard.tracking.store import client, tracking_uri

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

# What only the machine says, not the experiment: never copied from one run into another.
SYSTEM_PREFIX = "system/"
SYSTEM_METRICS_INTERVAL = 5.0  # seconds; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
_BATCH = 1000  # MLflow takes at most 1000 metrics per batch


def log_round(run_id: str, step: int, metrics: dict[str, float]) -> None:
    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def metric_history(run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) of every value logged for `key`, in logging order."""
    return [(m.step, m.value, m.timestamp) for m in client().get_metric_history(run_id, key)]


def latest(run_id: str, key: str = "test_accuracy") -> tuple[int, float] | None:
    """(step, value) of the highest step logged for `key`, or None before the first."""
    return max(((step, value) for step, value, _ in metric_history(run_id, key)), default=None)


def logged_steps(run_id: str, key: str = "test_accuracy") -> set[int]:
    return {step for step, _, _ in metric_history(run_id, key)}


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
    for i in range(0, len(batch), _BATCH):
        c.log_batch(run_id, metrics=batch[i : i + _BATCH])


def monitor_system(run_id: str) -> SystemMetricsMonitor:
    """Sample this machine's CPU, memory, disk and network (and GPUs, with `fedshard[gpu]`) into the
    run's system/ metrics with MLflow's own monitor, until .finish(); a resumed run continues its
    steps. The launcher runs it, so it covers all of an experiment's local processes."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=True, tracking_uri=tracking_uri()
    )
    monitor.start()
    return monitor
