"""Runs: creating and starting them (an experiment's, a sweep's and a sweep's children), their
params and tags, ending and reopening them, and reading them back as RunRecords.

A sweep is a parent run, each of its experiments a child run (tag mlflow.parentRunId), created by
the sweep and then taken over by `fedshard run` through MLFLOW_RUN_ID.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Param

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import described
from fedshard.tracking.checkpoints import CHECKPOINT_TAG
from fedshard.tracking.owners import owner_tags
from fedshard.tracking.store import NOTE_TAG, TrackingError, client, default_experiment_name, experiment_id

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)

FAILURE_TAG = "fedshard.failure_reason"
RUN_NAME_TAG = "mlflow.runName"  # setting it renames the run
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "fedshard.sweep"
# A claim's state (claims.py); a withdrawn claim is no experiment, whatever else it carries.
CLAIM_STATE_TAG, WITHDRAWN = "fedshard.claim.state", "withdrawn"
_PAGE = 1000  # runs per search request


@dataclass(frozen=True)
class RunRecord:
    """What sweeps and the exporter need to know about one run, detached from MLflow's types."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int
    params: dict
    tags: dict

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        """The record of an MLflow Run (as get_run and search_runs return it)."""
        return cls(
            run.info.run_id,
            run.info.experiment_id,
            run.info.status,
            run.info.start_time or 0,
            dict(run.data.params),
            dict(run.data.tags),
        )

    @property
    def checkpoint_round(self) -> int:
        """The round of the run's newest checkpoint, 0 when it has none."""
        with suppress(ValueError):
            return int(self.tags.get(CHECKPOINT_TAG) or 0)
        return 0

    @property
    def is_experiment(self) -> bool:
        """An experiment run (not a sweep's parent run, a withdrawn claim, nor any other run without a
        world_size)."""
        return (
            "world_size" in self.params
            and self.tags.get(SWEEP_TAG) != "true"
            and self.tags.get(CLAIM_STATE_TAG) != WITHDRAWN
        )

    def config(self, only: Iterable[str] | None = None) -> ExperimentConfig:
        """The run's configuration, parsed from its params whatever their spelling ('0.00001' and
        '1e-05' are one learning rate); `only` restricts it to those params (others default).
        Its precision is the one it really computed in (precision.recorded): runs from before
        fedshard recorded it, and `mlflow run` runs that logged `auto`, are read from their other
        params and tags. Raises ConfigError for params no config can have."""
        from fedshard.core.precision import recorded

        known = set(only or ExperimentConfig.__dataclass_fields__)
        values = {k: _unquote(v) for k, v in self.params.items() if k in known}
        if "precision" in known:
            values["precision"] = recorded({k: _unquote(v) for k, v in self.params.items()}, self.tags)
        return ExperimentConfig.from_mapping(values)


def run_record(run_id: str) -> RunRecord:
    return RunRecord.of(client().get_run(run_id))


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


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
        page = c.search_runs(
            [exp_id], filter_string=query, max_results=_PAGE, page_token=token, order_by=["attributes.start_time ASC"]
        )
        records += [RunRecord.of(r) for r in page]
        token = page.token
        if not token:
            return records


def _outer_run():
    """The run `mlflow run` made for this process (MLFLOW_RUN_ID), or None; it must be RUNNING,
    or this process would log into a run that has ended."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    run = client().get_run(run_id)
    if run.info.status != "RUNNING":
        raise TrackingError(f"MLFLOW_RUN_ID={run_id} is {run.info.status}, not RUNNING: refusing to log into it")
    return run


def start_run(cfg: ExperimentConfig, experiment_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run this experiment logs to: the one `mlflow run` made (MLFLOW_RUN_ID), or a new one."""
    c = client()
    outer = _outer_run()
    if outer is not None:
        run_id = outer.info.run_id
    else:
        name = default_experiment_name(experiment_name)
        run_id = c.create_run(experiment_id(name), run_name=cfg.run_name(), tags=tags or {}).info.run_id
    existing = c.get_run(run_id).data.tags  # what `mlflow run` or a sweep recorded stays
    source = {k: v for k, v in source_tags().items() if k not in existing}
    # `mlflow run` names its run like languid-bear-729: in the UI's run table it is named by what it is.
    set_tags(
        run_id, {**(tags or {}), **owner_tags(), **source, NOTE_TAG: cfg.description(), RUN_NAME_TAG: cfg.run_name()}
    )
    log_params(run_id, cfg)
    return run_id


def start_sweep_run(
    experiment_name: str, run_name: str, tags: dict[str, str], params: dict[str, str] | None = None
) -> tuple[str, str]:
    """The sweep's parent run and its experiment id: the run `mlflow run -e sweep` made
    (MLFLOW_RUN_ID, which must be RUNNING), or a new one; `params` are logged on it."""
    tags = {SWEEP_TAG: "true", **tags, **owner_tags(), **source_tags()}
    outer = _outer_run()
    if outer is not None:
        run_id, exp_id = outer.info.run_id, outer.info.experiment_id
        tags = {**tags, RUN_NAME_TAG: run_name}  # not the name `mlflow run -e sweep` made up
    else:
        exp_id = experiment_id(experiment_name)
        run_id = client().create_run(exp_id, run_name=run_name).info.run_id
    set_tags(run_id, tags)
    log_extra_params(run_id, params or {})
    return run_id, exp_id


def create_child_run(
    cfg: ExperimentConfig, experiment_id: str, parent_run_id: str, tags: dict[str, str] | None = None
) -> str:
    """A RUNNING run for one experiment of a sweep, nested under the sweep's run, with every
    parameter already logged (so even an attempt that dies at once shows its configuration)."""
    run_id = (
        client()
        .create_run(
            experiment_id,
            run_name=cfg.run_name(),
            tags={PARENT_TAG: parent_run_id, NOTE_TAG: cfg.description(), **source_tags(), **(tags or {})},
        )
        .info.run_id
    )
    log_extra_params(run_id, cfg.params())
    return run_id


def source_tags() -> dict[str, str]:
    """What code made the run, as `mlflow run` records it: the fedshard checkout's git commit
    (when fedshard runs from one), and who ran it."""
    import getpass
    import subprocess

    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.type": "LOCAL", "mlflow.source.name": "fedshard"}
    checkout = Path(__file__).resolve().parents[3]  # src/fedshard/tracking/runs.py in a checkout

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


def log_params(run_id: str, cfg: ExperimentConfig) -> None:
    """Log every config field canonically. `mlflow run` has already logged its parameters as
    typed (MLflow forbids changing a param), so those are only checked to mean the same value,
    read with the same rules (a setting that does not apply takes one value on both sides).
    precision=auto is not logged: the aggregator records what it resolves to (record_precision)."""
    existing = client().get_run(run_id).data.params
    ours = cfg.params()
    logged = {k: _unquote(v) for k, v in existing.items() if k in ours}
    theirs = ExperimentConfig.from_mapping({**ours, **logged}).params()
    mismatched = [f"{k}: logged {existing[k]!r}, running with {ours[k]!r}" for k in logged if theirs[k] != ours[k]]
    if mismatched:
        raise TrackingError(f"run {run_id} already has different params: " + "; ".join(mismatched))
    log_extra_params(
        run_id, {k: v for k, v in ours.items() if k not in existing and not (k == "precision" and v == "auto")}
    )


def record_precision(run_id: str, cfg: ExperimentConfig) -> None:
    """What the run really computes in (cfg.precision, resolved: bf16 or fp32), as its param
    `precision` where none is logged yet, else (after `mlflow run` logged `auto`) as the tag
    precision.TAG; the run's name follows, as bf16 is part of it."""
    from fedshard.core.precision import TAG

    if "precision" not in client().get_run(run_id).data.params:
        log_extra_params(run_id, {"precision": cfg.precision})
    set_tags(run_id, {TAG: cfg.precision, RUN_NAME_TAG: cfg.run_name()})


def _unquote(value: str) -> str:
    """`mlflow run` logs some values shell-quoted as they went into the command ('' for empty)."""
    if value[:1] in ("'", '"'):
        with suppress(ValueError):
            return "".join(shlex.split(value))
    return value


def log_extra_params(run_id: str, params: dict) -> None:
    """Params beyond the configuration's (a model's size, say): the same values may be logged again,
    as a resumed run does."""
    if params:
        client().log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def end_run(run_id: str, status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED, recording why when it did not finish."""
    set_tags(run_id, {**(tags or {}), **({FAILURE_TAG: reason[:5000]} if reason else {})})
    client().set_terminated(run_id, status)


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Set a FAILED, KILLED or stale run RUNNING again, owned by this process."""
    c = client()
    try:
        c.delete_tag(run_id, FAILURE_TAG)
    except Exception as exc:  # a run that failed without a reason has no such tag
        log.debug(f"run {run_id} had no failure reason to delete: {described(exc)}")
    set_tags(run_id, {**tags, **owner_tags()})
    c.update_run(run_id, status="RUNNING")
